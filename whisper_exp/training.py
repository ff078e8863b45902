"""Fine-tune with transformers' ``Seq2SeqTrainer`` and log everything to one MLflow run."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from transformers import (
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
    WhisperProcessor,
)

from whisper_exp import tracking
from whisper_exp.audio import SAMPLE_RATE, load_audio
from whisper_exp.config import ExperimentConfig
from whisper_exp.data import DatasetSplit, Example, load_splits
from whisper_exp.evaluation import EvalResult, evaluate_examples
from whisper_exp.metrics import make_normalizer, score
from whisper_exp.modeling import (
    apply_strategy,
    count_parameters,
    default_device,
    is_multilingual,
    load_base,
    save_trained,
)

log = logging.getLogger(__name__)


class SpeechDataset(torch.utils.data.Dataset):
    """Examples with tokenised labels; audio is decoded lazily in the collator."""

    def __init__(self, examples: list[Example], processor: WhisperProcessor):
        self.examples = examples
        self.labels = [processor.tokenizer(e.text).input_ids for e in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"audio": self.examples[index].audio, "labels": self.labels[index]}


@dataclass
class SpeechCollator:
    """Decode + log-mel per batch; labels padded with -100 and without the start token
    (the model prepends ``decoder_start_token_id`` when it shifts labels right)."""

    processor: WhisperProcessor
    decoder_start_token_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        audios = [load_audio(item["audio"]) for item in items]
        features = self.processor.feature_extractor(
            audios, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        labels = [item["labels"] for item in items]
        if all(ids and ids[0] == self.decoder_start_token_id for ids in labels):
            labels = [ids[1:] for ids in labels]
        width = max(len(ids) for ids in labels)
        padded = torch.full((len(labels), width), -100, dtype=torch.long)
        for row, ids in enumerate(labels):
            padded[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return {"input_features": features, "labels": padded}


class MlflowMetricsCallback(TrainerCallback):
    """Trainer logs -> MLflow metrics at the global step (rank 0 only).

    Written here rather than ``report_to="mlflow"`` so the run, its params and its naming stay
    ours: the built-in callback logs every TrainingArguments field and may open its own run.
    """

    RENAME = {"loss": "train_loss"}
    # The end-of-training summary; logged once as final metrics instead of as curve points.
    SKIP = {"total_flos", "train_runtime", "epoch", "train_loss", "train_samples_per_second",
            "train_steps_per_second"}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        metrics = {self.RENAME.get(k, k): float(v) for k, v in logs.items()
                   if isinstance(v, (int, float)) and k not in self.SKIP and math.isfinite(v)}
        if "epoch" in logs:
            metrics["epoch"] = float(logs["epoch"])
        if metrics:
            mlflow.log_metrics(metrics, step=state.global_step)


def _mixed_precision(cfg: ExperimentConfig, device: torch.device) -> dict[str, bool]:
    mode = cfg.training.mixed_precision
    if device.type != "cuda" or mode == "no" or cfg.finetuning.strategy == "qlora":
        # QLoRA computes in bnb_4bit_compute_dtype already; CPU trains in fp32.
        return {"fp16": False, "bf16": False}
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp16": mode == "fp16", "bf16": mode == "bf16"}


def training_arguments(cfg: ExperimentConfig, output_dir: Path, device: torch.device
                       ) -> Seq2SeqTrainingArguments:
    t = cfg.training
    eval_kwargs: dict[str, Any] = (
        {"eval_strategy": "steps", "eval_steps": t.eval_steps} if t.eval_steps > 0
        else {"eval_strategy": "epoch"}
    )
    return Seq2SeqTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=cfg.evaluation.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        predict_with_generate=True,
        generation_max_length=cfg.evaluation.max_new_tokens,
        generation_num_beams=cfg.evaluation.num_beams,
        report_to=[],
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=t.dataloader_workers,
        seed=t.seed,
        use_cpu=device.type == "cpu",
        **_mixed_precision(cfg, device),
        **eval_kwargs,
    )


def _wer_metric(processor: WhisperProcessor, language: str | None):
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


@dataclass
class TrainResult:
    run_id: str
    model_dir: Path
    final: EvalResult
    metrics: dict[str, float]


def _log_data(split: DatasetSplit) -> None:
    mlflow.log_params({"data.n_train": len(split.train), "data.n_eval": len(split.eval),
                       "data.split_method": split.split_method})
    tracking.log_csv(split.split_rows(), "data/split.csv")
    tracking.log_csv([vars(p) for p in split.skipped], "data/skipped_rows.csv",
                     fieldnames=["where", "file", "message"])
    mlflow.log_metric("data.skipped_rows", len(split.skipped))
    if split.notices:
        mlflow.log_text("\n".join(split.notices) + "\n", "data/notices.txt")
    for notice in split.notices:
        log.info(notice)


def train(
    cfg: ExperimentConfig,
    *,
    callbacks: Sequence[TrainerCallback] = (),
    nested: bool = False,
    tags: Mapping[str, str] | None = None,
) -> TrainResult:
    """Load data and model, fine-tune, evaluate, and log the whole run to MLflow.

    ``callbacks`` are extra Trainer callbacks (e.g. Optuna pruning); ``nested`` makes the run a
    child of the active run (one per trial under a study's parent run).
    """
    device = default_device()
    if not nested:
        tracking.configure(cfg.tracking.tracking_uri, cfg.tracking.experiment_name)
    run_name = cfg.tracking.run_name or f"{cfg.finetuning.strategy}-{Path(cfg.model.name).name}"
    run_tags = {"whisper_exp.entry_point": "train", **(tags or {})}
    with tracking.run(run_name=run_name, nested=nested, tags=run_tags) as active:
        run_id = active.info.run_id
        tracking.log_params(cfg.flat())
        mlflow.log_params({"git_commit": tracking.git_commit() or "", "device": device.type})
        mlflow.log_text(cfg.to_yaml(), "config.yaml")
        tracking.reset_peak_memory(device)

        model, processor = load_base(cfg.model, cfg.finetuning, device)
        split = load_splits(
            cfg.data, seed=cfg.training.seed,
            count_label_tokens=lambda text: len(processor.tokenizer(text).input_ids),
            max_label_tokens=model.config.max_target_positions,
        )
        _log_data(split)
        model = apply_strategy(model, cfg.finetuning)
        params = count_parameters(model)
        mlflow.log_metrics({"trainable_params": params.trainable, "total_params": params.total,
                            "trainable_percent": params.percent})
        log.info("trainable params: %d of %d (%.2f%%)", params.trainable, params.total,
                 params.percent)

        output_dir = Path(cfg.training.output_dir) / run_id
        language = cfg.model.language if is_multilingual(model) else "english"
        trainer = Seq2SeqTrainer(
            model=model,
            args=training_arguments(cfg, output_dir / "trainer", device),
            train_dataset=SpeechDataset(split.train, processor),
            eval_dataset=SpeechDataset(split.eval, processor),
            data_collator=SpeechCollator(processor, model.config.decoder_start_token_id),
            compute_metrics=_wer_metric(processor, language),
            callbacks=[MlflowMetricsCallback(), *callbacks],
        )
        started = time.perf_counter()
        outcome = trainer.train()
        wall = time.perf_counter() - started

        model_dir = save_trained(trainer.model, processor, output_dir / "model", cfg)
        tracking.log_directory(model_dir, "model")

        model.eval()
        final = evaluate_examples(trainer.model, processor, split.eval, cfg.evaluation,
                                  language=language)
        tracking.log_csv(final.rows, "eval/predictions.csv")
        peak, kind = tracking.peak_memory_mb(device)
        metrics = {
            "wer": final.scores.wer,
            "cer": final.scores.cer,
            "peak_memory_mb": peak,
            "train_samples_per_second": outcome.metrics.get("train_samples_per_second", 0.0),
            "train_steps_per_second": outcome.metrics.get("train_steps_per_second", 0.0),
            "train_runtime_s": wall,
            "train_loss_mean": outcome.metrics.get("train_loss", math.nan),
            "global_steps": outcome.global_step,
            "eval_rtfx": final.rtfx,
        }
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        mlflow.set_tag("peak_memory_kind", kind)
        log.info("run %s: WER %.2f%%, CER %.2f%%", run_id, 100 * final.scores.wer,
                 100 * final.scores.cer)
        return TrainResult(run_id, model_dir, final, metrics)
