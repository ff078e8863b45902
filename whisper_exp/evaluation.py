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
from whisper_exp.data import Example, load_eval_only
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


def run_evaluation(
    model: str,
    data: str,
    cfg: ExperimentConfig,
    compare_with: str | None = None,
) -> EvaluationReport:
    """The ``evaluate`` entry point: one MLflow run, one or two models on one dataset.

    With ``compare_with`` (the base model), both are scored on identical data and the run logs
    ``base_wer``, ``wer`` and ``wer_delta`` plus a side-by-side table; the data is a guard set:
    worse than the base by more than ``evaluation.max_regression`` tags ``regression.eval``.
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
                             "git_commit": tracking.git_commit()})
        examples = None
        for prefix, reference in models.items():
            loaded_model, processor = load_for_inference(reference, device,
                                                         language=cfg.model.language,
                                                         task=cfg.model.task)
            if examples is None:
                split = load_eval_only(
                    data, cfg.data, seed=cfg.training.seed,
                    language=(loaded_model.generation_config.language
                              if is_multilingual(loaded_model) else "english"),
                    count_label_tokens=lambda t, p=processor: len(p.tokenizer(t).input_ids),
                    max_label_tokens=loaded_model.config.max_target_positions,
                )
                examples = split.eval
                for notice in split.notices:
                    log.info(notice)
                if split.skipped:
                    tracking.log_csv([vars(p) for p in split.skipped], "skipped_rows.csv")
                mlflow.log_param("data.n_utterances", len(examples))
                corpus = run_page.log_evaluation_dataset(data, cfg.data, split)
            tracking.reset_peak_memory(device)
            result = evaluate_examples(loaded_model, processor, examples, cfg.evaluation,
                                       language=cfg.model.language)
            results[prefix] = result
            log.info("%s%s: WER %.2f%% CER %.2f%% on %d utterances (RTFx %.1f)", prefix,
                     reference, 100 * result.scores.wer, 100 * result.scores.cer,
                     len(result.rows), result.rtfx)
            mlflow.log_metrics(result.metrics(prefix), dataset=corpus)
            del loaded_model
        report.log_evaluation_report(results, examples, worst_n=cfg.evaluation.worst_n)
        peak, kind = tracking.peak_memory_mb(device)
        mlflow.log_metric("peak_memory_mb", peak)
        mlflow.set_tag("peak_memory_kind", kind)
        if compare_with is not None:
            base, tuned = results["base_"], results[""]
            regressions.append(guards.check_regression(guards.PRIMARY, tuned, base,
                                                       cfg.evaluation.max_regression))
            guards.log_regression(regressions[-1])  # wer_delta, and the tag past the threshold
            tracking.log_csv(compare_rows(base, tuned), "comparison.csv")
        run_page.set_description(run_page.evaluation_description(
            model=model, data=corpus, wer=results[""].scores.wer, cer=results[""].scores.cer,
            base_model=compare_with,
            base_wer=results["base_"].scores.wer if compare_with is not None else None))
        return EvaluationReport(active.info.run_id, results, regressions)
