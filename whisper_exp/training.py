"""Fine-tune with transformers' ``Seq2SeqTrainer`` and log everything to one MLflow run."""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from transformers import (
    Seq2SeqTrainingArguments,
    TrainerCallback,
    WhisperProcessor,
    set_seed,
)

from whisper_exp import augmentation, guards, report, run_page, tracking, truecasing
from whisper_exp.cache import shared_cache
from whisper_exp.cache_training import (
    CachedEncoderCollator,
    CachedEncoderTrainer,
    MelFeatures,
    prepare_encoder_cache,
)
from whisper_exp.config import ConfigError, ExperimentConfig, load_config
from whisper_exp.data import DatasetSplit, load_splits
from whisper_exp.evaluation import EvalResult, evaluate_examples
from whisper_exp.labels import (
    EpochCallback,
)
from whisper_exp.modeling import (
    apply_strategy,
    count_parameters,
    default_device,
    frozen_encoder_layers,
    is_multilingual,
    load_base,
    load_for_inference,
    save_trained,
    whisper_encoder,
)
from whisper_exp.storage import checkpoint_space_callback, last_good_checkpoint
from whisper_exp.train_callbacks import (
    KeepBestCallback,
    MlflowMetricsCallback,
    curve_name,
    restore_best,
    wer_metric,
)
from whisper_exp.train_data import SpeechCollator, SpeechDataset
from whisper_exp.trainer import WhisperTrainer

log = logging.getLogger(__name__)


def _targets(cfg: ExperimentConfig, model: torch.nn.Module) -> dict[str, Any] | None:
    """TrainingTargets options when timestamp or prompt training is on (else plain labels)."""
    t = cfg.training
    if not (t.timestamp_probability or t.prompt_probability):
        return None
    return {"timestamp_probability": t.timestamp_probability,
            "prompt_probability": t.prompt_probability, "seed": t.seed,
            "max_positions": model.config.max_target_positions}


def _mixed_precision(cfg: ExperimentConfig, device: torch.device) -> dict[str, bool]:
    """Trainer's fp16/bf16 flags. On CPU only an explicit ``bf16`` autocasts (fast where the CPU
    has bf16 matrix units: AVX512-BF16 / AMX); ``auto`` stays fp32 there and fp16 is refused."""
    mode = cfg.training.mixed_precision
    if mode == "no" or cfg.finetuning.strategy == "qlora":
        # QLoRA computes in bnb_4bit_compute_dtype already.
        return {"fp16": False, "bf16": False}
    if device.type != "cuda":
        if mode == "fp16":
            raise ValueError("training.mixed_precision=fp16 needs a CUDA GPU; on CPU use bf16 "
                             "(autocast) or no")
        return {"fp16": False, "bf16": mode == "bf16"}
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
        save_strategy=("steps" if t.checkpoint_steps > 0
                       else "epoch" if t.checkpoint_steps == 0 else "no"),
        save_steps=t.checkpoint_steps if t.checkpoint_steps > 0 else 500,
        save_total_limit=t.checkpoints_kept,
        predict_with_generate=True,
        # Token budgets come from WhisperTrainer (per batch, as every other decode).
        generation_max_length=None,
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


@dataclass
class TrainResult:
    run_id: str
    model_dir: Path
    final: EvalResult | None  # None on ranks other than 0 in multi-process training
    metrics: dict[str, float]
    # Guard sets compared with the base model (exceeded ones fail --fail-on-regression).
    regressions: list[guards.Regression] = field(default_factory=list)


# Tag with the absolute folder of a run's checkpoints and model, so --resume finds them from any
# working directory (training.output_dir may be relative).
OUTPUT_DIR_TAG = "whisper_exp.output_dir"


def _last_checkpoint(trainer_dir: Path) -> Path | None:
    """The newest complete checkpoint: one cut short by a full disk or a kill is skipped."""
    return last_good_checkpoint(trainer_dir)


@dataclass
class ResumePoint:
    run_id: str
    checkpoint: Path  # <output_dir>/<run_id>/trainer/checkpoint-N

    @property
    def output_dir(self) -> Path:
        return self.checkpoint.parent.parent


def resume(run_id: str, tracking_uri: str | None = None) -> TrainResult:
    """Continue a crashed or killed training run in the same MLflow run, in whatever experiment
    it lives: same config (the run's ``config.yaml``), its last Trainer checkpoint (found through
    the absolute folder recorded on the run), steps and metrics continuing. Refuses, rather than
    silently starting over, when no checkpoint is there."""
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    launched = os.environ.get("MLFLOW_RUN_ID")
    if launched and launched != run_id:
        raise ConfigError(f"resume={run_id} but MLflow started run {launched}; with `mlflow run` "
                          f"pass --run-id {run_id} so the same run continues")
    try:
        run = MlflowClient().get_run(run_id)
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    except Exception as exc:
        raise ConfigError(f"cannot resume run {run_id}: {exc}") from None
    if run.info.status == "FINISHED":
        raise ConfigError(f"run {run_id} already FINISHED; start a new run instead")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(text)
    cfg = load_config(handle.name)
    os.unlink(handle.name)
    recorded = run.data.tags.get(OUTPUT_DIR_TAG)
    output_dir = Path(recorded) if recorded else Path(cfg.training.output_dir) / run_id
    checkpoint = _last_checkpoint(output_dir / "trainer")
    if checkpoint is None:
        raise ConfigError(
            f"cannot resume run {run_id}: no checkpoint in {output_dir.resolve() / 'trainer'} "
            "(the run stopped before its first checkpoint, training.checkpoint_steps=-1 turned "
            "them off, or the folder was moved or deleted); nothing was restarted. Start a new "
            "run instead.")
    # The run's own experiment, whatever the config or `mlflow run --experiment-name` said.
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    return train(cfg, resume=ResumePoint(run_id, checkpoint))


def _log_data(split: DatasetSplit, mlf: tracking.Tracker) -> None:
    mlf.log_params({"data.n_train": len(split.train), "data.n_eval": len(split.eval),
                       "data.split_method": split.split_method})
    mlf.log_csv(split.split_rows(), "data/split.csv")
    mlf.log_csv([vars(p) for p in split.skipped], "data/skipped_rows.csv",
                     fieldnames=["where", "file", "message"])
    mlf.log_metrics({"data.skipped_rows": len(split.skipped)})
    if split.notices:
        mlf.log_text("\n".join(split.notices) + "\n", "data/notices.txt")
    for notice in split.notices:
        log.info(notice)


def _final_evaluation(cfg: ExperimentConfig, model: torch.nn.Module, processor: WhisperProcessor,
                      model_dir: Path, split: DatasetSplit, language: str | None,
                      device: torch.device
                      ) -> tuple[EvalResult, str, torch.nn.Module, WhisperProcessor]:
    """Score the model that ``register`` and ``export`` ship: for QLoRA that is the adapter
    merged into the fp32 base (re-loaded from ``model_dir``), not the 4-bit model trained.
    Returns the result, its description, and the model and processor scored."""
    if cfg.finetuning.strategy == "qlora":
        merged, merged_processor = load_for_inference(str(model_dir), device)
        result = evaluate_examples(merged, merged_processor, split.eval, cfg.evaluation,
                                   language=language)
        return (result, "adapter merged into the fp32 base (as registered and exported)",
                merged, merged_processor)
    model.eval()
    result = evaluate_examples(model, processor, split.eval, cfg.evaluation, language=language)
    return result, "the trained model (as registered and exported)", model, processor


def train(
    cfg: ExperimentConfig,
    *,
    callbacks: Sequence[TrainerCallback] = (),
    nested: bool = False,
    tags: Mapping[str, str] | None = None,
    resume: ResumePoint | None = None,
) -> TrainResult:
    """Load data and model, fine-tune, evaluate, and log the whole run to MLflow.

    ``callbacks`` are extra Trainer callbacks (e.g. Optuna pruning); ``nested`` makes the run a
    child of the active run (one per trial under a study's parent run). ``resume`` continues a
    run from its checkpoint (use :func:`resume`, which finds both and the run's config).
    """
    device = default_device()
    resume_run_id = resume.run_id if resume else None
    # Checked (noise folder read) before anything loads: a bad augmentation key fails at once.
    perturbations = augmentation.training_perturbations(cfg.augmentation, cfg.training.seed)
    if not nested and resume is None:
        tracking.configure(cfg.tracking.tracking_uri, cfg.tracking.experiment_name)
    run_name = cfg.tracking.run_name or f"{cfg.finetuning.strategy}-{Path(cfg.model.name).name}"
    run_tags = {"whisper_exp.entry_point": "train", **(tags or {})}
    mlf = tracking.Tracker()  # under torchrun, only rank 0 logs
    with tracking.main_process_run(run_name=run_name, nested=nested, tags=run_tags,
                                   run_id=resume_run_id,
                                   log_system_metrics=cfg.tracking.system_metrics) as active:
        run_id = active.info.run_id
        if resume_run_id is None:
            mlf.log_params(cfg.flat())
            world = tracking.world_size()
            mlf.log_params({"git_commit": tracking.git_commit() or "", "device": device.type,
                            "training.world_size": world,
                            "training.effective_batch_size": cfg.training.batch_size
                            * cfg.training.gradient_accumulation_steps * world})
            mlf.log_text(cfg.to_yaml(), "config.yaml")
        tracking.reset_peak_memory(device)

        # Seeded before the model is built: peft draws the LoRA A matrices from the global RNG,
        # which Trainer only seeds later, so a run's result depended on what the process did
        # before it (an Optuna trial after a pruned one started from other adapters).
        set_seed(cfg.training.seed)
        model, processor = load_base(cfg.model, cfg.finetuning, device)
        # What load_base put in the prompt (model.language, or the default with a notice): the
        # transcripts' text case and the WER normaliser follow it.
        language = model.generation_config.language if is_multilingual(model) else "english"
        # The base model scored on guard sets gets the same language prompt.
        base_language = language if is_multilingual(model) else None
        label_limits = dict(
            count_label_tokens=lambda text: len(processor.tokenizer(text).input_ids),
            max_label_tokens=model.config.max_target_positions)
        split = load_splits(cfg.data, seed=cfg.training.seed, language=language, **label_limits)
        # text_case=truecase: words take the base model's case (its transcripts, cached).
        mlf.log_metrics(truecasing.recase_split(cfg, split, device, base_language, language))
        _log_data(split, mlf)
        # Read now: a missing or broken eval set fails before anything trains.
        eval_sets = guards.load_eval_sets(cfg, seed=cfg.training.seed, language=language,
                                          **label_limits)
        mlf.log_params({f"data.n_eval.{name}": len(s.eval) for name, s in eval_sets.items()})
        model = apply_strategy(model, cfg.finetuning)
        params = count_parameters(model)
        mlf.log_metrics({"trainable_params": params.trainable, "total_params": params.total,
                            "trainable_percent": params.percent})
        log.info("trainable params: %d of %d (%.2f%%)", params.trainable, params.total,
                 params.percent)

        output_dir = (resume.output_dir if resume
                      else Path(cfg.training.output_dir).expanduser().resolve() / run_id)
        if resume is None:
            mlf.set_tag(OUTPUT_DIR_TAG, str(output_dir))
        # From here metrics survive a tracking server outage, and the run stays on disk
        # (config, metrics, model) for `whisper-exp upload-run` if the server never comes back.
        mlf.keep_on_disk(output_dir, cfg.to_yaml(), run_name=run_name,
                         tags={**run_tags, OUTPUT_DIR_TAG: str(output_dir)})
        train_set = SpeechDataset(split.train, processor, _targets(cfg, model), perturbations,
                                  max_duration_s=cfg.data.max_duration_s)
        eval_set = SpeechDataset(split.eval, processor)
        mlf.log_metrics({"train_examples": len(train_set),
                         "augmentation.copies_dropped": train_set.dropped})
        corpora = (run_page.log_training_datasets(cfg.data, split, train_set, eval_set)
                   if mlf.enabled else None)
        start_id = model.config.decoder_start_token_id
        features = MelFeatures(processor)
        if cfg.training.cache_features:
            features.cache = shared_cache(f"mel-{features.cache_namespace()}",
                                          cfg.training.cache_dir, cfg.training.cache_memory_mb,
                                          "float32", max_disk_gb=cfg.training.cache_max_gb)
            features.cache.reset_counters()
        encoder_cache = prepare_encoder_cache(cfg, model, [train_set, eval_set], features,
                                              device, mlf)
        encoder = whisper_encoder(model)
        masking = augmentation.attach_spec_augment(
            model, encoder, frozen_encoder_layers(cfg.finetuning, len(encoder.layers)),
            cached=encoder_cache is not None, aug=cfg.augmentation)
        mlf.set_tag("augmentation.spec_augment", masking.where if masking else "off")
        keeper = KeepBestCallback()
        trainer_kwargs: dict[str, Any] = dict(
            model=model,
            args=training_arguments(cfg, output_dir / "trainer", device),
            train_dataset=train_set,
            eval_dataset=eval_set,
            compute_metrics=wer_metric(processor, language),
            callbacks=[MlflowMetricsCallback(), checkpoint_space_callback(output_dir / "trainer"),
                       keeper, *callbacks,
                       *([EpochCallback(train_set.targets)] if train_set.targets else [])],
            max_new_tokens=cfg.evaluation.max_new_tokens,
            layer_lr_decay=cfg.training.layer_lr_decay,
        )
        if encoder_cache is not None:
            # An entry evicted by training.cache_max_gb comes back as mel features and is
            # recomputed (and stored again) by the trainer.
            trainer = CachedEncoderTrainer(
                **trainer_kwargs, encoder_split=encoder_cache.split,
                encoder_store=encoder_cache.store,
                spec_augment=masking.hidden if masking else None,
                data_collator=CachedEncoderCollator(encoder_cache.store, start_id,
                                                    features=features))
        else:
            trainer = WhisperTrainer(**trainer_kwargs,
                                     data_collator=SpeechCollator(features, start_id))
        checkpoint = resume.checkpoint if resume else None
        if checkpoint is not None:
            mlf.set_tag("resumed_from", checkpoint.name)
            log.info("resuming run %s from %s", run_id, checkpoint)
        started = time.perf_counter()
        try:
            outcome = trainer.train(
                resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:
            if masking is not None:  # the saved model's config masks nothing
                masking.detach()
        wall = time.perf_counter() - started

        if not mlf.enabled:  # other ranks: the main process saves, evaluates and logs
            return TrainResult(run_id, output_dir / "model", None, {})
        model_dir = save_trained(trainer.model, processor, output_dir / "model", cfg)
        final, evaluated, scored_model, scored_processor = _final_evaluation(
            cfg, trainer.model, processor, model_dir, split, language, device)
        # The curve's last point: the Trainer's evaluation at the last step computed the loss
        # only, this decode (the one the objective and pruning read) completes it.
        mlf.log_metrics({curve_name("eval_wer"): final.scores.wer,
                         curve_name("eval_cer"): final.scores.cer}, step=outcome.global_step)
        model_step = outcome.global_step
        best_step = (restore_best(trainer, keeper, output_dir / "trainer", final.scores.wer)
                     if cfg.training.keep_best else None)
        if best_step is not None:  # an earlier evaluation beat the last step: ship that one
            model_step = best_step
            model_dir = save_trained(trainer.model, processor, output_dir / "model", cfg)
            final, evaluated, scored_model, scored_processor = _final_evaluation(
                cfg, trainer.model, processor, model_dir, split, language, device)
        mlf.set_tag("wer_model", f"{evaluated}, weights of step {model_step}")
        mlf.set_tag("best_step", str(model_step))
        mlf.log_directory(model_dir, "model")

        base = functools.cache(lambda: load_for_inference(
            cfg.model.name, device, language=base_language, task=cfg.model.task))
        scored = {"": final}
        regressions = []
        if cfg.evaluation.guard_primary:
            base_model, base_processor = base()
            scored["base_"] = evaluate_examples(base_model, base_processor, split.eval,
                                                cfg.evaluation, language=language)
            mlf.log_metrics(scored["base_"].metrics("base_"))
            regressions.append(guards.check_regression(guards.PRIMARY, final, scored["base_"],
                                                       cfg.evaluation.max_regression))
            guards.log_regression(regressions[-1])
        report.log_evaluation_report(scored, split.eval, worst_n=cfg.evaluation.worst_n,
                                     csv_dir="eval")
        _, set_regressions = guards.score_eval_sets(eval_sets, cfg, scored_model,
                                                    scored_processor, language=language,
                                                    base=base)
        regressions += set_regressions
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
            "best_step": model_step,
            "eval_rtfx": final.rtfx,
        }
        if encoder_cache is not None:
            metrics["cache_encoder_hit_rate"] = encoder_cache.store.hit_rate
        if features.cache is not None:
            metrics["cache_mel_hit_rate"] = features.cache.hit_rate
        # Logged with the run's LoggedModel (the pyfunc `register` ships) and eval dataset.
        run_page.log_training_outcome(cfg, model_dir, metrics, corpora)
        mlf.set_tag("peak_memory_kind", kind)
        log.info("run %s: WER %.2f%%, CER %.2f%%", run_id, 100 * final.scores.wer,
                 100 * final.scores.cer)
        return TrainResult(run_id, model_dir, final, metrics, regressions)
