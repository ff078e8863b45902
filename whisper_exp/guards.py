"""Guards against what fine-tuning breaks: named eval sets (``data.eval_sets``) scored beside the
primary one by train's final evaluation and by ``evaluate``, each with its own prefixed metrics
and report, and a regression check of guard sets against the base model (``<set>/wer_delta``,
tag ``regression.<set>``; ``--fail-on-regression`` turns it into exit code 3)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import mlflow
import torch
from transformers import WhisperProcessor

from whisper_exp import report
from whisper_exp.config import ConfigError, ExperimentConfig
from whisper_exp.data import DatasetSplit, load_eval_set
from whisper_exp.evaluation import EvalResult, evaluate_examples, log_split_notes

log = logging.getLogger(__name__)

# The primary set (data.eval or the held-out split): unprefixed metrics, tag regression.eval.
PRIMARY = "eval"
# Exit code of train/evaluate --fail-on-regression when a guard set regressed.
REGRESSION_EXIT_CODE = 3
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

ModelLoader = Callable[[], tuple[torch.nn.Module, WhisperProcessor]]


@dataclass
class Regression:
    """Tuned vs base WER on one guard set."""

    name: str
    tuned_wer: float
    base_wer: float
    max_regression: float

    @property
    def delta(self) -> float:
        return self.tuned_wer - self.base_wer

    @property
    def exceeded(self) -> bool:
        return math.isfinite(self.delta) and self.delta > self.max_regression

    def message(self) -> str:
        return (f"tuned is worse by {100 * self.delta:.2f} points (WER {100 * self.tuned_wer:.2f}"
                f"% vs base {100 * self.base_wer:.2f}%, evaluation.max_regression "
                f"{100 * self.max_regression:.2f})")


def check_regression(name: str, tuned: EvalResult, base: EvalResult,
                     max_regression: float) -> Regression:
    return Regression(name, tuned.scores.wer, base.scores.wer, max_regression)


def log_regression(regression: Regression) -> None:
    """``<set>/wer_delta`` (plain ``wer_delta`` for the primary set) and, past the threshold, the
    warning tag ``regression.<set>``."""
    prefix = "" if regression.name == PRIMARY else f"{regression.name}/"
    if math.isfinite(regression.delta):
        mlflow.log_metric(f"{prefix}wer_delta", regression.delta)
    if regression.exceeded:
        mlflow.set_tag(f"regression.{regression.name}", regression.message())
        log.warning("regression on %s: %s", regression.name, regression.message())


def failure_line(regressions: list[Regression]) -> str | None:
    """The one line ``--fail-on-regression`` prints, or None when no guard set regressed."""
    failed = [r for r in regressions if r.exceeded]
    if not failed:
        return None
    return "regression: " + "; ".join(f"{r.name}: {r.message()}" for r in failed)


def load_eval_sets(cfg: ExperimentConfig, **options: Any) -> dict[str, DatasetSplit]:
    """Every ``data.eval_sets`` entry read and validated (``load_eval_only`` options), before any
    training: a missing or broken set raises ``DataError`` naming it."""
    sets = {}
    for name, spec in cfg.data.eval_sets.items():
        if not _SET_NAME.match(name) or name == PRIMARY:
            raise ConfigError(f"data.eval_sets: {name!r} is not a usable set name (letters, "
                              f"digits, _ . -; {PRIMARY!r} is the primary set)")
        sets[name] = load_eval_set(name, spec.source, cfg.data, split=spec.split, **options)
    return sets


def score_eval_sets(
    sets: Mapping[str, DatasetSplit], cfg: ExperimentConfig, model: torch.nn.Module,
    processor: WhisperProcessor, *, language: str | None, base: ModelLoader | None,
) -> tuple[dict[str, EvalResult], list[Regression]]:
    """Score the model on each named set (metrics ``<set>/wer`` ..., report under
    ``eval/<set>/``); guard sets also with the base model (``base``: wrap the loader in
    ``functools.cache`` to load it once), compared."""
    results: dict[str, EvalResult] = {}
    regressions = []
    for name, split in sets.items():
        log_split_notes(split, name)
        tuned = evaluate_examples(model, processor, split.eval, cfg.evaluation, language=language)
        mlflow.log_metrics(tuned.metrics(f"{name}/"))
        scored = {"": tuned}
        if cfg.data.eval_sets[name].guard:
            if base is None:
                log.warning("eval set %s is a guard but no base model was given: not compared",
                            name)
            else:
                base_model, base_processor = base()
                scored["base_"] = evaluate_examples(base_model, base_processor, split.eval,
                                                    cfg.evaluation, language=language)
                mlflow.log_metrics(scored["base_"].metrics(f"{name}/base_"))
                regression = check_regression(name, tuned, scored["base_"],
                                              cfg.evaluation.max_regression)
                log_regression(regression)
                regressions.append(regression)
        report.log_evaluation_report(scored, split.eval, worst_n=cfg.evaluation.worst_n,
                                     csv_dir=f"{report.REPORT_DIR}/{name}", name=name,
                                     notes=split.notices)
        results[name] = tuned
        log.info("eval set %s: WER %.2f%% on %d utterances", name, 100 * tuned.scores.wer,
                 len(tuned.rows))
    return results, regressions
