"""Model Registry: a run's model becomes a servable pyfunc version with the run's metrics, an
alias that moves, LoRA adapters merged (or kept, with their base recorded), and ``models:/``
references that load everywhere."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from servers import b64, wav_bytes

from whisper_exp.audio import SAMPLE_RATE, load_audio
from whisper_exp.cli import main
from whisper_exp.metrics import english_normalizer, score
from whisper_exp.modeling import load_for_inference, resolve_model_reference
from whisper_exp.registry import RegistryError, register_run


@pytest.fixture(autouse=True)
def _experiments_in_tmp(tmp_path):
    """Experiments whose artifacts (registered models are full checkpoints) stay in tmp_path,
    not in ./mlruns; also replaces the experiment id an earlier ``train`` left active."""
    for name in ("registry-test", "test"):
        mlflow.create_experiment(name, artifact_location=(tmp_path / name).as_uri())
    mlflow.set_experiment("registry-test")


def _model_run(model_dir: Path, metrics: dict[str, float]) -> str:
    """A finished run holding a Hugging Face model as its ``model`` artifact (like train's)."""
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_dir), "model")
        mlflow.log_metrics(metrics)
    return run.info.run_id


def test_register_links_metrics_and_moves_alias(tiny_english_path):
    run_id = _model_run(tiny_english_path, {"wer": 0.3, "cer": 0.125})
    client = MlflowClient()
    first = register_run(run_id, alias="champion")
    assert (first.name, str(first.version), first.aliases) == ("whisper-exp", "1", ["champion"])
    assert first.tags["wer"] == "0.3" and first.tags["cer"] == "0.125"
    assert first.tags["source_run_id"] == run_id and first.tags["packaging"] == "full model"
    assert "wer 0.3000" in first.description and run_id in first.description
    assert first.run_id == run_id, "the version links back to its run"

    second = register_run(run_id, alias="champion")
    assert str(second.version) == "2"
    assert str(client.get_model_version_by_alias("whisper-exp", "champion").version) == "2"
    assert client.get_model_version("whisper-exp", "1").aliases == []

    local = Path(resolve_model_reference("models:/whisper-exp@champion"))
    assert (local / "model.safetensors").exists()
    requirements = (local.parent.parent / "requirements.txt").read_text().split()
    names = {re.split("==", r)[0] for r in requirements}
    assert {"mlflow", "torch", "transformers", "soundfile", "soxr", "pandas"} <= names
    assert "peft" not in names, "a full model needs no peft"
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", r) for r in requirements)


def test_registered_model_transcribes_real_speech_and_long_audio(tiny_en_path, dev_dir):
    """Real-asset layer: the registered pyfunc hears real speech, also past one 30 s window."""
    register_run(_model_run(tiny_en_path, {"wer": 0.3}), alias="champion")
    rows = list(csv.DictReader((dev_dir / "metadata.csv").open(encoding="utf-8")))
    pause = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    clips: list[np.ndarray] = []
    while sum(len(c) + len(pause) for c in clips) <= 31 * SAMPLE_RATE:  # just past one window
        clips.append(load_audio(dev_dir / rows[len(clips)]["file_name"]))
    recording = np.concatenate([x for clip in clips for x in (clip, pause)])
    model = mlflow.pyfunc.load_model("models:/whisper-exp@champion")
    request = pd.DataFrame({"audio": [
        b64((dev_dir / rows[0]["file_name"]).read_bytes()),  # flac as stored
        b64(wav_bytes(clips[1])),
        b64(wav_bytes(recording)),
    ]})
    output = model.predict(request, params={"return_timestamps": True})
    assert list(output.columns) == ["text", "segments"] and len(output) == 3
    normalize = english_normalizer()
    references = [rows[0]["transcription"], rows[1]["transcription"],
                  " ".join(row["transcription"] for row in rows[:len(clips)])]
    assert score(references[:2], list(output["text"][:2]), normalize).wer < 0.35
    assert score(references[2:], [output["text"][2]], normalize).wer < 0.45
    segments = output["segments"][2]
    assert segments[-1]["end"] > 30 and segments[-1]["end"] <= len(recording) / SAMPLE_RATE
    assert set(segments[0]) == {"start", "end", "text"}
    plain = model.predict(request.iloc[:1])
    assert list(plain.columns) == ["text"] and plain["text"][0] == output["text"][0]


def test_train_register_merges_lora_and_adapter_only_keeps_it(tiny_english_path, sample_dir,
                                                                tmp_path):
    runner = CliRunner()
    trained = runner.invoke(main, [
        "train", "--model", str(tiny_english_path), "--data", str(sample_dir),
        "--strategy", "lora", "--max-steps", "1", "--batch-size", "2", "--experiment", "test",
        "--set", "data.max_eval_samples=2", "--set", "evaluation.max_new_tokens=8",
        "--set", "evaluation.batch_size=2", "--set", f"training.output_dir={tmp_path / 'out'}",
        # No warmup: its first step has learning rate 0, leaving the adapter at zero.
        "--set", "training.warmup_steps=0",
        "--register", "whisper-exp", "--alias", "champion"])
    assert trained.exit_code == 0, trained.output
    run_id = re.search(r"run_id=(\w+)", trained.output).group(1)
    assert "registered=whisper-exp version=1 alias=champion" in trained.output

    client = MlflowClient()
    merged = client.get_model_version_by_alias("whisper-exp", "champion")
    assert merged.tags["packaging"] == "merged adapter, fp32"
    assert merged.tags["strategy"] == "lora" and merged.tags["source_run_id"] == run_id
    assert merged.tags["base_model"] == str(tiny_english_path)
    assert "wer" in merged.tags and "trainable_params" in merged.tags
    local = Path(resolve_model_reference("models:/whisper-exp@champion"))
    assert not (local / "adapter_config.json").exists() and (local / "model.safetensors").exists()

    from transformers import WhisperForConditionalGeneration

    registered = WhisperForConditionalGeneration.from_pretrained(local).state_dict()
    expected, _ = load_for_inference(f"runs:/{run_id}", torch.device("cpu"))
    base = WhisperForConditionalGeneration.from_pretrained(tiny_english_path).state_dict()
    assert registered.keys() == expected.state_dict().keys()
    assert all(torch.equal(registered[k], v) for k, v in expected.state_dict().items())
    assert all(v.dtype == torch.float32 for v in registered.values() if v.is_floating_point())
    q_proj = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(registered[q_proj], base[q_proj]), "the adapter is merged in"

    adapter = runner.invoke(main, ["register", "--run", run_id, "--name", "whisper-exp-adapter",
                                   "--adapter-only"])
    assert adapter.exit_code == 0, adapter.output
    assert "registered=whisper-exp-adapter version=1" in adapter.output
    version = client.get_model_version("whisper-exp-adapter", "1")
    assert version.tags["packaging"] == "adapter only"
    assert "logged_model_id" in version.tags, "the adapter train logged, registered as is"
    assert "logged_model_id" not in merged.tags, "merging packages a new model"
    assert version.tags["base_model"] == str(tiny_english_path)
    adapter_dir = Path(resolve_model_reference("models:/whisper-exp-adapter/1"))
    assert (adapter_dir / "adapter_config.json").exists()
    assert not (adapter_dir / "model.safetensors").exists()
    assert "peft==" in (adapter_dir.parent.parent / "requirements.txt").read_text()

    clip = b64((sample_dir / "001350134.flac").read_bytes())
    request, params = pd.DataFrame({"audio": [clip]}), {"max_new_tokens": 6}
    from_merged = mlflow.pyfunc.load_model("models:/whisper-exp@champion").predict(request,
                                                                                  params=params)
    from_adapter = mlflow.pyfunc.load_model("models:/whisper-exp-adapter/1").predict(
        request, params=params)
    assert from_merged["text"][0] == from_adapter["text"][0]


def test_runs_that_cannot_be_registered_say_why(tmp_path):
    with pytest.raises(RegistryError, match="not found at tracking URI"):
        register_run("0" * 32)
    with mlflow.start_run() as evaluate_run:
        mlflow.log_metric("wer", 0.5)
    with pytest.raises(RegistryError, match="has no 'model' artifact"):
        register_run(evaluate_run.info.run_id)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with mlflow.start_run() as failed:
        mlflow.log_artifacts(str(tmp_path / "model"), "model")
        mlflow.end_run("FAILED")
    with pytest.raises(RegistryError, match="is FAILED"):
        register_run(failed.info.run_id)
    result = CliRunner().invoke(main, ["register", "--run", "0" * 32])
    assert result.exit_code == 2 and "error: run '000" in result.stderr


def test_train_alias_needs_register():
    result = CliRunner().invoke(main, ["train", "--alias", "champion"])
    assert result.exit_code == 2 and "--alias needs --register NAME" in result.output


def test_register_uses_the_logged_model_train_logged(tiny_english_path, sample_dir, tmp_path):
    """No re-packaging: the version is the run's own LoggedModel, with today's tags."""
    from whisper_exp.config import load_config
    from whisper_exp.registry import PACKAGING_TAG, trained_model
    from whisper_exp.training import train

    result = train(load_config(None, {
        "model": {"name": str(tiny_english_path)},
        "data": {"train": str(sample_dir), "max_eval_samples": 2, "max_train_samples": 2},
        "finetuning": {"strategy": "full"},
        "training": {"max_steps": 1, "batch_size": 2, "output_dir": str(tmp_path / "out")},
        "evaluation": {"batch_size": 2, "max_new_tokens": 4},
        "tracking": {"experiment_name": "test", "system_metrics": False},
    }))
    logged = trained_model(result.run_id)
    assert logged.tags[PACKAGING_TAG] == "full model"
    version = register_run(result.run_id, alias="champion")
    assert version.source == logged.model_uri and version.run_id == result.run_id
    assert version.tags["logged_model_id"] == logged.model_id
    assert version.tags["packaging"] == "full model" and version.tags["strategy"] == "full"
    assert "wer" in version.tags and "wer" in version.description
    models = mlflow.search_logged_models(experiment_ids=[mlflow.get_run(
        result.run_id).info.experiment_id], output_format="list")
    assert len(models) == 1, "registering did not log a second copy"
    local = Path(resolve_model_reference("models:/whisper-exp@champion"))
    assert (local / "model.safetensors").exists()


def test_old_run_with_only_a_model_folder_still_registers(tiny_english_path):
    """Runs logged before train logged a LoggedModel: packaged from their ``model/`` folder."""
    run_id = _model_run(tiny_english_path, {"wer": 0.5})
    version = register_run(run_id)
    assert version.tags["packaging"] == "full model" and "logged_model_id" not in version.tags
    assert version.run_id == run_id
    model, _ = load_for_inference("models:/whisper-exp/1", torch.device("cpu"))
    assert model.config.d_model == 64
