"""Fast dev runs of the whole training pipeline per strategy (tiny random model) plus one real
step per strategy on tiny.en (real-asset layer), read back through the MLflow client."""

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from whisper_exp.config import load_config
from whisper_exp.data import DataError
from whisper_exp.training import MelFeatures, SpeechCollator, train

ROOT = Path(__file__).resolve().parent.parent


def _cfg(model, data, tmp_path, config_path=None, **finetuning):
    return load_config(config_path, {
        "model": {"name": str(model)},
        "data": {"train": str(data), "max_eval_samples": 2},
        "finetuning": finetuning,
        "training": {"max_steps": 2, "batch_size": 2, "logging_steps": 1,
                     "output_dir": str(tmp_path / "outputs")},
        "evaluation": {"batch_size": 2, "max_new_tokens": 8},
        "tracking": {"experiment_name": "test"},
    })


def _artifacts(run_id, path=""):
    client = MlflowClient()
    files = []
    for item in client.list_artifacts(run_id, path):
        files += _artifacts(run_id, item.path) if item.is_dir else [item.path]
    return files


def test_collator_strips_start_token_and_masks_padding(whisper_tokenizer_path, sample_dir):
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(whisper_tokenizer_path)
    start = processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    ids = [processor.tokenizer(t).input_ids for t in ("Hi.", "A longer one.")]
    batch = SpeechCollator(MelFeatures(processor), start)([
        {"audio": str(sample_dir / "001350134.flac"), "labels": ids[0], "key": "a",
         "seconds": 2.5},
        {"audio": str(sample_dir / "001350243.flac"), "labels": ids[1], "key": "b",
         "seconds": 4.0},
    ])
    assert batch["audio_seconds"].tolist() == [2.5, 4.0], "the eval budget's clip lengths"
    assert batch["input_features"].shape == (2, 80, 3000)
    assert batch["labels"][0, 0].item() != start
    assert batch["labels"][1].tolist() == ids[1][1:]
    assert (batch["labels"][0, len(ids[0]) - 1:] == -100).all()


def test_fast_dev_run_logs_everything(tiny_multilingual_path, sample_dir, tmp_path):
    result = train(_cfg(tiny_multilingual_path, sample_dir, tmp_path, strategy="lora"))
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["finetuning.strategy"] == "lora"
    assert params["finetuning.lora.r"] == "32"
    assert params["training.learning_rate"] == "0.001"
    assert params["model.name"] == str(tiny_multilingual_path)
    assert int(params["data.n_train"]) + int(params["data.n_eval"]) <= 16
    assert params["data.split_method"].startswith("speaker-disjoint")
    assert "git_commit" in params
    metrics = run.data.metrics
    for key in ("wer", "cer", "peak_memory_mb", "trainable_params", "total_params",
                "train_samples_per_second", "train_runtime_s", "eval/wer", "eval/loss",
                "train/loss", "train/learning_rate", "train/grad_norm", "train/epoch"):
        assert key in metrics, key
    assert metrics["peak_memory_mb"] > 100
    assert run.data.tags["peak_memory_kind"] == "process_peak_rss"
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    history = MlflowClient().get_metric_history(result.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2], "learning curve per logging step"
    assert not {"train_loss", "eval_wer", "loss", "learning_rate"} & set(metrics), \
        "curves are grouped under train/ and eval/ only"
    files = _artifacts(result.run_id)
    for expected in ("config.yaml", "data/split.csv", "data/skipped_rows.csv",
                     "eval/predictions.csv", "model/adapter_config.json",
                     "model/adapter_model.safetensors", "model/whisper_exp.json",
                     "model/tokenizer_config.json"):
        assert expected in files, expected
    table = mlflow.artifacts.load_text(f"runs:/{result.run_id}/eval/predictions.csv")
    assert table.splitlines()[0] == "file,reference,hypothesis,wer"
    assert (tmp_path / "outputs" / result.run_id / "model").is_dir(), "per-run output dir"
    # No model.language for a multilingual model: trained (and recorded) as English, so
    # inference defaults to what it was trained for.
    recorded = json.loads(mlflow.artifacts.load_text(
        f"runs:/{result.run_id}/model/whisper_exp.json"))
    assert recorded["language"] == "english"


STRATEGY_STEPS = [("full", {"freeze_encoder": True}), ("qlora", {"gradient_checkpointing": True})]


def _one_step_run(model, data, tmp_path, strategy, extra):
    """One optimizer step of a shipped strategy config on 2 utterances, checked FINISHED."""
    cfg = _cfg(model, data, tmp_path, ROOT / "experiments" / f"{strategy}.yaml",
               strategy=strategy, **extra)
    cfg.training.max_steps = 1
    cfg.data.max_train_samples = 2
    result = train(cfg)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["global_steps"] == 1
    assert run.data.metrics["train/loss"] > 0
    return result, run


@pytest.mark.parametrize("strategy, extra", STRATEGY_STEPS)
def test_each_strategy_trains_a_step_and_logs_its_model(tiny_english_path, sample_dir, tmp_path,
                                                        strategy, extra):
    result, run = _one_step_run(tiny_english_path, sample_dir, tmp_path, strategy, extra)
    assert run.data.params["finetuning.strategy"] == strategy
    files = _artifacts(result.run_id)
    model_config = json.loads((tiny_english_path / "config.json").read_text())
    d_model, layers = model_config["d_model"], model_config["decoder_layers"]
    if strategy == "full":
        assert "model/model.safetensors" in files
        # freeze_encoder: exactly the decoder trains (its positions are learned, unlike the
        # encoder's sinusoids), tied output projection counted once.
        from transformers import WhisperForConditionalGeneration

        model = WhisperForConditionalGeneration.from_pretrained(tiny_english_path)
        decoder = sum(p.numel() for p in model.model.decoder.parameters())
        assert run.data.metrics["trainable_params"] == decoder
        assert run.data.metrics["total_params"] == sum(p.numel() for p in model.parameters())
    else:
        assert "model/adapter_model.safetensors" in files
        r = int(run.data.params["finetuning.lora.r"])
        targets = run.data.params["finetuning.lora.target_modules"]
        assert "q_proj" in targets and "v_proj" in targets
        # q and v of the encoder self-attention and decoder self+cross attention, A and B each
        n_attention = model_config["encoder_layers"] + 2 * layers
        assert run.data.metrics["trainable_params"] == n_attention * 2 * (2 * r * d_model)
    assert len(result.final.rows) == int(run.data.params["data.n_eval"])


@pytest.mark.parametrize("strategy, extra", STRATEGY_STEPS)
def test_real_tiny_en_trains_a_step(tiny_en_path, sample_dir, tmp_path, strategy, extra):
    result, run = _one_step_run(tiny_en_path, sample_dir, tmp_path, strategy, extra)
    files = _artifacts(result.run_id)
    if strategy == "full":
        assert "model/model.safetensors" in files
        assert run.data.metrics["trainable_params"] < run.data.metrics["total_params"]
    else:
        assert "model/adapter_model.safetensors" in files
    # The step must not wreck the model: children's clips keep CER near stock (~0.5), while a
    # destroyed model (e.g. full fine-tune at LoRA's 1e-3) emits junk at CER > 0.9.
    assert all(row["hypothesis"] for row in result.final.rows)
    assert result.final.scores.cer < 0.8


def test_bad_data_fails_the_run_and_keeps_its_config(tiny_english_path, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "metadata.csv").write_text("file_name,transcription\nx.wav,hi\n")
    with pytest.raises(DataError, match="x.wav: audio file not found"):
        train(_cfg(tiny_english_path, tmp_path / "data", tmp_path, strategy="lora"))
    runs = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "config.yaml" in _artifacts(runs[0].info.run_id)


def test_lora_run_does_not_depend_on_the_global_rng(tiny_english_path, sample_dir, tmp_path):
    """Two runs of one config give the same losses whatever the process drew before (the LoRA
    init used to come from an unseeded global RNG: Optuna trials were not reproducible)."""
    losses = []
    for before in (1, 2):
        torch.manual_seed(before)
        result = train(_cfg(tiny_english_path, sample_dir, tmp_path / str(before),
                            strategy="lora"))
        history = MlflowClient().get_metric_history(result.run_id, "train/loss")
        losses.append([m.value for m in history])
    assert losses[0] and losses[0] == losses[1]


def test_cpu_run_uses_fp32(tiny_english_path, sample_dir, tmp_path):
    from whisper_exp.training import training_arguments

    cfg = _cfg(tiny_english_path, sample_dir, tmp_path, strategy="lora")
    args = training_arguments(cfg, tmp_path, torch.device("cpu"))
    assert not args.fp16 and not args.bf16


@pytest.mark.parametrize("mode, bf16", [("auto", False), ("no", False), ("bf16", True)])
def test_cpu_autocasts_bf16_only_when_asked(tiny_english_path, sample_dir, tmp_path, mode, bf16):
    from whisper_exp.training import training_arguments

    cfg = _cfg(tiny_english_path, sample_dir, tmp_path, strategy="lora")
    cfg.training.mixed_precision = mode
    args = training_arguments(cfg, tmp_path, torch.device("cpu"))
    assert (args.bf16, args.fp16) == (bf16, False)


def test_cpu_refuses_fp16(tiny_english_path, sample_dir, tmp_path):
    from whisper_exp.training import training_arguments

    cfg = _cfg(tiny_english_path, sample_dir, tmp_path, strategy="lora")
    cfg.training.mixed_precision = "fp16"
    with pytest.raises(ValueError, match="mixed_precision=fp16 needs a CUDA GPU"):
        training_arguments(cfg, tmp_path, torch.device("cpu"))


def test_bf16_covers_the_encoder_layers_above_the_cache(tiny_english_path, sample_dir, tmp_path,
                                                        monkeypatch):
    """On the cached path the trainable encoder top runs outside model.forward (where accelerate
    autocasts); with bf16 its matmuls must still run in bf16, in training steps."""
    from whisper_exp import cache_training

    seen: list[torch.dtype] = []
    top = cache_training.EncoderSplit.top

    def recording_top(self, hidden):
        layer = self.encoder.layers[self.k].fc1
        handle = layer.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        try:
            return top(self, hidden)
        finally:
            handle.remove()

    monkeypatch.setattr(cache_training.EncoderSplit, "top", recording_top)
    cfg = _cfg(tiny_english_path, sample_dir, tmp_path, strategy="lora",
               freeze_encoder_layers=1)
    cfg.training.mixed_precision = "bf16"
    result = train(cfg)
    assert mlflow.get_run(result.run_id).data.params["cache.encoder_active"] == "True"
    assert seen and set(seen) == {torch.bfloat16}, seen


@pytest.mark.parametrize("steps, strategy", [(0, "epoch"), (5, "steps"), (-1, "no")])
def test_checkpoint_schedule(tiny_english_path, sample_dir, tmp_path, steps, strategy):
    from whisper_exp.training import training_arguments

    cfg = _cfg(tiny_english_path, sample_dir, tmp_path, strategy="lora")
    cfg.training.checkpoint_steps = steps
    args = training_arguments(cfg, tmp_path, torch.device("cpu"))
    assert args.save_strategy == strategy


def test_qlora_run_scores_the_model_it_registers(tiny_english_path, sample_dir, tmp_path,
                                                monkeypatch):
    """QLoRA trains a 4-bit base, but register/export ship the adapter merged into the fp32
    base: the run's wer must be that model's, not the 4-bit one's."""
    import whisper_exp.training as training

    scored = []
    original = training.evaluate_examples

    def spy(model, *args, **kwargs):
        scored.append(sorted({type(m).__name__ for m in model.modules()
                              if "Linear" in type(m).__name__}))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(training, "evaluate_examples", spy)
    cfg = _cfg(tiny_english_path, sample_dir, tmp_path, strategy="qlora")
    cfg.training.max_steps = 1
    result = train(cfg)
    assert scored == [["Linear"]], "scored the fp32 merged model: no 4-bit or LoRA layers"
    assert "fp32 base" in mlflow.get_run(result.run_id).data.tags["wer_model"]


@pytest.mark.parametrize("finetuning", [{"strategy": "lora"},
                                        {"strategy": "full", "freeze_encoder": True}],
                         ids=["standard-collator", "cached-encoder"])
def test_timestamp_and_prompt_targets_train_end_to_end(tiny_english_path, sample_dir, tmp_path,
                                                       monkeypatch, finetuning):
    """Both probabilities at 1.0: every training batch has timestamp labels and prompted rows
    with explicit decoder inputs, on the standard and the cached-encoder collator alike."""
    from transformers import WhisperTokenizer

    import whisper_exp.cache_training as cache_training
    import whisper_exp.train_data as train_data
    from whisper_exp.labels import IGNORE, SpecialTokens

    special = SpecialTokens.from_tokenizer(WhisperTokenizer.from_pretrained(tiny_english_path))
    batches = []

    def spy(items, start_id):
        batch = training_collate(items, start_id)
        batches.append(batch)
        return batch

    training_collate = train_data.collate_labels
    monkeypatch.setattr(train_data, "collate_labels", spy)
    monkeypatch.setattr(cache_training, "collate_labels", spy)
    cfg = _cfg(tiny_english_path, sample_dir, tmp_path, **finetuning)
    cfg.training.max_steps, cfg.training.batch_size = 1, 16  # the whole train split, one batch
    cfg.training.timestamp_probability = cfg.training.prompt_probability = 1.0
    result = train(cfg)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] > 0
    assert run.data.params["cache.encoder_active"] == str("freeze_encoder" in finetuning)
    trained = [b for b in batches if "decoder_input_ids" in b]
    assert len(trained) == 1, "the training batch is prompted; eval batches are plain"
    decoder, labels = trained[0]["decoder_input_ids"], trained[0]["labels"]
    prompted = decoder[:, 0] == special.previous
    split = mlflow.artifacts.load_text(f"runs:/{result.run_id}/data/split.csv").splitlines()
    speakers = {row.split(",")[1] for row in split[1:] if row.endswith(",train")}
    assert len(decoder) == len(speakers) + prompted.sum(), "all but each speaker's first"
    assert (labels[prompted, 0] == IGNORE).all(), "prompt positions are not trained on"
    assert not (labels == special.no_timestamps).any(), "every row has timestamps"
    assert (labels == special.time_zero).sum() == len(labels), "one <|0.00|> per row"
    assert all("decoder_input_ids" not in b for b in batches if b is not trained[0])
