"""What the Trainer reports while it trains: curves to MLflow under ``train/`` and ``eval/``,
WER/CER at each evaluation, and the best evaluation's weights kept for the model that ships.

Split from ``training.py`` (which wires them into a run) so that module stays about the run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback, WhisperProcessor

from whisper_exp import tracking
from whisper_exp.metrics import make_normalizer, score
from whisper_exp.trainer import WhisperTrainer

log = logging.getLogger(__name__)


def curve_name(key: str) -> str:
    """The MLflow name of a Trainer log key: evaluations (``eval_wer``) under ``eval/``, the
    rest (``loss``, ``learning_rate``, ``grad_norm``, ``epoch``) under ``train/``, so the UI's
    charts page shows them as train/ and eval/ sections beside system/."""
    if key.startswith("eval_"):
        return "eval/" + key.removeprefix("eval_")
    return "train/" + key


class MlflowMetricsCallback(TrainerCallback):
    """Trainer logs -> MLflow metrics at the global step (rank 0 only), named by ``curve_name``.

    Written here rather than ``report_to="mlflow"`` so the run, its params and its naming stay
    ours: the built-in callback logs every TrainingArguments field and may open its own run.
    """

    # The end-of-training summary; logged once as final metrics instead of as curve points.
    SKIP = {"total_flos", "train_runtime", "train_loss", "train_samples_per_second",
            "train_steps_per_second"}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        metrics = {curve_name(k): float(v) for k, v in logs.items()
                   if isinstance(v, (int, float)) and k not in self.SKIP and math.isfinite(v)}
        if metrics:
            tracking.log_metrics(metrics, step=state.global_step)  # survives an outage


def wer_metric(processor: WhisperProcessor, language: str | None):
    normalize = make_normalizer(processor.tokenizer, language)
    pad = processor.tokenizer.pad_token_id

    def compute(prediction) -> dict[str, float]:
        predictions = np.where(prediction.predictions < 0, pad, prediction.predictions)
        labels = np.where(prediction.label_ids < 0, pad, prediction.label_ids)
        hyps = processor.tokenizer.batch_decode(predictions, skip_special_tokens=True)
        refs = processor.tokenizer.batch_decode(labels, skip_special_tokens=True)
        scores = score(refs, hyps, normalize)
        return {"wer": scores.wer, "cer": scores.cer}

    return compute


class KeepBestCallback(TrainerCallback):
    """Remembers the evaluation with the lowest ``eval_wer`` in ``state.best_metric`` /
    ``best_global_step`` (so Trainer's checkpoint rotation keeps that checkpoint and a resumed
    run still knows it) and, when no checkpoint is written at that step, copies the trainable
    weights to CPU memory (for LoRA just the adapter)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.weights: dict[str, torch.Tensor] = {}

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        wer = (metrics or {}).get("eval_wer")
        if wer is None or not math.isfinite(wer) or model is None:
            return  # the last step's evaluation is loss-only: train() decodes after it
        if state.best_metric is not None and wer >= state.best_metric:
            return
        state.best_metric, state.best_global_step = float(wer), state.global_step
        if control.should_save:  # Trainer writes checkpoint-<step> right after this
            self.step, self.weights = None, {}
            return
        self.step = state.global_step
        self.weights = {name: param.detach().to("cpu", copy=True)
                        for name, param in model.named_parameters() if param.requires_grad}

    def restore(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.weights.items():
                params[name].copy_(value.to(params[name].device))


def restore_best(trainer: WhisperTrainer, keeper: KeepBestCallback, trainer_dir: Path,
                  last_wer: float) -> int | None:
    """Load the best intermediate evaluation's weights into ``trainer.model`` when its WER beats
    the final decode's ``last_wer``; returns its step, or None when the last model is kept."""
    state = trainer.state
    step, best = state.best_global_step, state.best_metric
    if step is None or best is None or step >= state.global_step or not best < last_wer:
        return None
    checkpoint = trainer_dir / f"checkpoint-{step}"
    if checkpoint.is_dir():
        trainer._load_from_checkpoint(str(checkpoint))
    elif keeper.step == step:
        keeper.restore(trainer.model)
    else:
        log.warning("best evaluation was at step %d but neither its checkpoint nor its weights "
                    "are left (resumed run?): keeping the last step's model", step)
        return None
    log.info("keeping step %d (eval WER %.2f%%) over the last step (%.2f%%)", step, 100 * best,
             100 * last_wer)
    return step
