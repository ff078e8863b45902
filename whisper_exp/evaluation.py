"""Transcribe a dataset with any model and score it; optionally base vs fine-tuned side by side."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from whisper_exp import tracking
from whisper_exp.audio import SAMPLE_RATE, load_audio
from whisper_exp.config import EvaluationConfig, ExperimentConfig
from whisper_exp.data import Example, load_eval_only
from whisper_exp.decoding import default_max_new_tokens
from whisper_exp.metrics import Scores, make_normalizer, score, utterance_wer
from whisper_exp.modeling import default_device, is_multilingual, load_for_inference

log = logging.getLogger(__name__)


@torch.inference_mode()
def generate_batches(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    audios: Sequence[np.ndarray],
    *,
    batch_size: int = 16,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    **generate_kwargs: Any,
) -> list[torch.Tensor]:
    """Generated token ids per clip (each up to 30 s), in input order.

    Batches are length-sorted so padding is rare; ``generate_kwargs`` go to ``model.generate``
    (``num_beams``, ``return_timestamps``, ``language`` ...); without a ``max_new_tokens`` each
    batch gets ``decoding.default_max_new_tokens`` of its longest clip. ``on_batch(n)`` is
    called after each batch of ``n`` clips (for progress over files).
    """
    max_new_tokens = generate_kwargs.pop("max_new_tokens", None)
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    ids: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(audios)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="transcribing", unit="batch", disable=not progress):
        features = processor.feature_extractor(
            [audios[i] for i in batch], sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features.to(device, dtype)
        longest_s = max(len(audios[i]) for i in batch) / SAMPLE_RATE
        generated = model.generate(
            input_features=features, **generate_kwargs,
            max_new_tokens=max_new_tokens or default_max_new_tokens(longest_s))
        for index, row in zip(batch, generated.cpu(), strict=True):
            ids[index] = row
        if on_batch is not None:
            on_batch(len(batch))
    return ids


def transcribe_arrays(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    audios: Sequence[np.ndarray],
    *,
    batch_size: int = 16,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Batched greedy (or beam) decoding of clips up to 30 s to plain text (``max_new_tokens``
    None: scaled to the clip length, as in ``generate_batches``)."""
    ids = generate_batches(model, processor, audios, batch_size=batch_size, progress=progress,
                           num_beams=num_beams, max_new_tokens=max_new_tokens)
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


@dataclass
class EvalResult:
    scores: Scores
    rows: list[dict[str, Any]]
    audio_seconds: float
    wall_seconds: float
    extra: dict[str, float] = field(default_factory=dict)

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
    language: str | None = "english",
    progress: bool = True,
) -> EvalResult:
    audios = [load_audio(e.audio) for e in examples]
    start = time.perf_counter()
    hypotheses = transcribe_arrays(model, processor, audios, batch_size=cfg.batch_size,
                                   num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                                   progress=progress)
    wall = time.perf_counter() - start
    normalize = make_normalizer(processor.tokenizer,
                                language if is_multilingual(model) else "english")
    references = [e.text for e in examples]
    rows = [
        {"file": e.name, "reference": e.text, "hypothesis": hyp,
         "wer": utterance_wer(e.text, hyp, normalize)}
        for e, hyp in zip(examples, hypotheses, strict=True)
    ]
    return EvalResult(score(references, hypotheses, normalize), rows,
                      sum(len(a) for a in audios) / SAMPLE_RATE, wall)


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


def run_evaluation(
    model: str,
    data: str,
    cfg: ExperimentConfig,
    compare_with: str | None = None,
) -> EvaluationReport:
    """The ``evaluate`` entry point: one MLflow run, one or two models on one dataset.

    With ``compare_with`` (the base model), both are scored on identical data and the run logs
    ``base_wer``, ``wer`` and ``wer_delta`` plus a side-by-side table.
    """
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
                    count_label_tokens=lambda t, p=processor: len(p.tokenizer(t).input_ids),
                    max_label_tokens=loaded_model.config.max_target_positions,
                )
                examples = split.eval
                for notice in split.notices:
                    log.info(notice)
                if split.skipped:
                    tracking.log_csv([vars(p) for p in split.skipped], "skipped_rows.csv")
                mlflow.log_param("data.n_utterances", len(examples))
            tracking.reset_peak_memory(device)
            result = evaluate_examples(loaded_model, processor, examples, cfg.evaluation,
                                       language=cfg.model.language)
            results[prefix] = result
            log.info("%s%s: WER %.2f%% CER %.2f%% on %d utterances (RTFx %.1f)", prefix,
                     reference, 100 * result.scores.wer, 100 * result.scores.cer,
                     len(result.rows), result.rtfx)
            mlflow.log_metrics(result.metrics(prefix))
            tracking.log_csv(result.rows, f"{prefix}predictions.csv")
            del loaded_model
        peak, kind = tracking.peak_memory_mb(device)
        mlflow.log_metric("peak_memory_mb", peak)
        mlflow.set_tag("peak_memory_kind", kind)
        if compare_with is not None:
            base, tuned = results["base_"], results[""]
            mlflow.log_metric("wer_delta", tuned.scores.wer - base.scores.wer)
            tracking.log_csv(compare_rows(base, tuned), "comparison.csv")
        return EvaluationReport(active.info.run_id, results)
