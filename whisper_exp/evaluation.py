"""Transcribe a dataset with any model and score it; optionally base vs fine-tuned side by side."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlflow
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from whisper_exp import report, run_page, tracking
from whisper_exp.audio import SAMPLE_RATE, load_audio
from whisper_exp.config import EvaluationConfig, ExperimentConfig
from whisper_exp.data import NO_REFERENCE, DatasetSplit, Example, load_eval_only
from whisper_exp.generation import (
    transcribe_arrays,  # noqa: F401  (benchmarks import it here)
    transcribe_arrays_with_budget,
)
from whisper_exp.long_form import LongFormResult, run_check
from whisper_exp.metrics import Normalizer, Scores, make_normalizer, score, utterance_wer
from whisper_exp.modeling import default_device, is_multilingual, load_for_inference

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    scores: Scores
    rows: list[dict[str, Any]]
    audio_seconds: float
    wall_seconds: float
    extra: dict[str, float] = field(default_factory=dict)
    normalize: Normalizer | None = None  # the one WER/CER were scored with (the report names it)
    # The long-form check (evaluation.long_form): metrics, table and notes for the report.
    long_form: LongFormResult | None = None

    @property
    def rtfx(self) -> float:
        """Audio seconds transcribed per wall-clock second."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else math.nan

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}wer": self.scores.wer, f"{prefix}cer": self.scores.cer,
                f"{prefix}rtfx": self.rtfx, f"{prefix}n_utterances": len(self.rows)}


def evaluate_examples(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    examples: Sequence[Example],
    cfg: EvaluationConfig,
    language: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Decode ``examples`` clip by clip and score them; then the long-form check
    (``evaluation.long_form``) joins them into recordings and decodes those whole."""
    audios = [load_audio(e.audio) for e in examples]
    start = time.perf_counter()
    hypotheses, budget_hits = transcribe_arrays_with_budget(
        model, processor, audios, batch_size=cfg.batch_size, num_beams=cfg.num_beams,
        max_new_tokens=cfg.max_new_tokens, progress=progress)
    wall = time.perf_counter() - start
    # The language scored: the requested one, else the model's own (None: detected per clip,
    # scored with the English normaliser).
    if is_multilingual(model):
        language = language or getattr(model.generation_config, "language", None)
    normalize = make_normalizer(processor.tokenizer,
                                language if is_multilingual(model) else "english")
    references = [e.text for e in examples]
    rows = [
        {"file": e.name, "reference": e.text, "hypothesis": hyp,
         "wer": utterance_wer(e.text, hyp, normalize), "duration_s": len(audio) / SAMPLE_RATE,
         "budget_hit": hit}
        for e, hyp, audio, hit in zip(examples, hypotheses, audios, budget_hits, strict=True)
    ]
    checked = run_check(
        model, processor, audios, references, [e.speaker for e in examples], hypotheses,
        normalize, cfg, language=language if is_multilingual(model) else None)
    return EvalResult(score(references, hypotheses, normalize), rows,
                      sum(len(a) for a in audios) / SAMPLE_RATE, wall, normalize=normalize,
                      long_form=checked)


def compare_rows(base: EvalResult, tuned: EvalResult) -> list[dict[str, Any]]:
    """Per-utterance side-by-side table: same files in the same order."""
    return [
        {"file": b["file"], "reference": b["reference"], "base_hypothesis": b["hypothesis"],
         "tuned_hypothesis": t["hypothesis"], "base_wer": b["wer"], "tuned_wer": t["wer"],
         "delta_wer": t["wer"] - b["wer"]}
        for b, t in zip(base.rows, tuned.rows, strict=True)
    ]


@dataclass
class EvaluationReport:
    run_id: str
    results: dict[str, EvalResult]
    # Under --compare: the model against the base (guards.Regression), for --fail-on-regression.
    regressions: list[Any] = field(default_factory=list)
    # data.eval_sets: the model's result on each named set.
    eval_sets: dict[str, EvalResult] = field(default_factory=dict)


def run_evaluation(
    model: str,
    data: str,
    cfg: ExperimentConfig,
    compare_with: str | None = None,
) -> EvaluationReport:
    """The ``evaluate`` entry point: one MLflow run, one or two models on one dataset, and on
    each ``data.eval_sets`` entry (metrics ``<set>/...``, as train's final evaluation).

    With ``compare_with`` (the base model), both are scored on identical data and the run logs
    ``base_wer``, ``wer`` and ``wer_delta`` plus a side-by-side table; the data is a guard set:
    worse than the base by more than ``evaluation.max_regression`` tags ``regression.eval``.
    Named sets marked ``guard`` are compared with that base the same way (``<set>/wer_delta``,
    ``regression.<set>``).
    """
    from whisper_exp import guards  # guards builds on this module

    regressions = []
    device = default_device()
    tracking.configure(cfg.tracking.tracking_uri, cfg.tracking.experiment_name)
    models = {"": model} if compare_with is None else {"base_": compare_with, "": model}
    results: dict[str, EvalResult] = {}
    with tracking.run(run_name=cfg.tracking.run_name or "evaluate",
                      tags={"whisper_exp.entry_point": "evaluate"}) as active:
        tracking.log_params({"model": model, "data": data, "compare_with": compare_with,
                             "evaluation.num_beams": cfg.evaluation.num_beams,
                             "evaluation.batch_size": cfg.evaluation.batch_size,
                             "evaluation.long_form": cfg.evaluation.long_form,
                             "git_commit": tracking.git_commit()})
        examples = None
        eval_sets: dict[str, Any] = {}
        kept: dict[str, tuple[Any, WhisperProcessor]] = {}  # models the named sets score
        for prefix, reference in models.items():
            loaded_model, processor = load_for_inference(reference, device,
                                                         language=cfg.model.language,
                                                         task=cfg.model.task)
            if examples is None:
                options = dict(
                    seed=cfg.training.seed,
                    language=(loaded_model.generation_config.language
                              if is_multilingual(loaded_model) else "english"),
                    count_label_tokens=lambda t, p=processor: len(p.tokenizer(t).input_ids),
                    max_label_tokens=loaded_model.config.max_target_positions,
                )
                split = load_eval_only(data, cfg.data, **options)
                # Read now: a missing or broken named set fails before anything is decoded.
                eval_sets = guards.load_eval_sets(cfg, **options)
                examples = split.eval
                log_split_notes(split)
                mlflow.log_param("data.n_utterances", len(examples))
                mlflow.log_params({f"data.n_eval.{name}": len(s.eval)
                                   for name, s in eval_sets.items()})
                corpus = run_page.log_evaluation_dataset(data, cfg.data, split)
            tracking.reset_peak_memory(device)
            result = evaluate_examples(loaded_model, processor, examples, cfg.evaluation,
                                       language=cfg.model.language)
            results[prefix] = result
            log.info("%s%s: WER %.2f%% CER %.2f%% on %d utterances (RTFx %.1f)", prefix,
                     reference, 100 * result.scores.wer, 100 * result.scores.cer,
                     len(result.rows), result.rtfx)
            mlflow.log_metrics(result.metrics(prefix), dataset=corpus)
            if eval_sets:
                kept[prefix] = (loaded_model, processor)
            del loaded_model
        report.log_evaluation_report(results, examples, worst_n=cfg.evaluation.worst_n,
                                     notes=split.notices)
        if compare_with is not None:
            base, tuned = results["base_"], results[""]
            regressions.append(guards.check_regression(guards.PRIMARY, tuned, base,
                                                       cfg.evaluation.max_regression))
            guards.log_regression(regressions[-1])  # wer_delta, and the tag past the threshold
            tracking.log_csv(compare_rows(base, tuned), "comparison.csv")
        set_results: dict[str, EvalResult] = {}
        if eval_sets:
            set_results, set_regressions = guards.score_eval_sets(
                eval_sets, cfg, *kept.pop(""), language=cfg.model.language,
                base=(lambda: kept["base_"]) if compare_with is not None else None)
            regressions += set_regressions
            kept.clear()
        peak, kind = tracking.peak_memory_mb(device)
        mlflow.log_metric("peak_memory_mb", peak)
        mlflow.set_tag("peak_memory_kind", kind)
        run_page.set_description(run_page.evaluation_description(
            model=model, data=corpus, wer=results[""].scores.wer, cer=results[""].scores.cer,
            base_model=compare_with,
            base_wer=results["base_"].scores.wer if compare_with is not None else None))
        return EvaluationReport(active.info.run_id, results, regressions, set_results)


def log_split_notes(split: DatasetSplit, name: str = "") -> None:
    """What loading an eval set left out and why: ``skipped_rows.csv`` (under ``data/<name>/``
    for a named set) and the count of rows without a reference (``unscored_rows``)."""
    prefix = f"{name}/" if name else ""
    for notice in split.notices:
        log.info("%s%s", f"eval set {name}: " if name else "", notice)
    if split.skipped:
        tracking.log_csv([vars(p) for p in split.skipped],
                         f"data/{name}/skipped_rows.csv" if name else "skipped_rows.csv")
    mlflow.log_metric(f"{prefix}unscored_rows",
                      sum(p.message == NO_REFERENCE for p in split.skipped))
