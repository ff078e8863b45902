"""Safe model loading: pickle-only folders refused unless opted in, weight hashes checked.

Models are the 2-layer random Whisper from conftest (no ../shared needed).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from whisper_exp.config import ModelConfig
from whisper_exp.modeling import load_base, load_for_inference
from whisper_exp.safety import (
    ALLOW_PICKLE_ENV,
    UnsafeModelError,
    WeightsMismatchError,
    check_model_folder,
    verify_weights,
    weights_digest,
    weights_sha256,
)

ROOT = Path(__file__).resolve().parent.parent


def _pickle_only_copy(model_dir: Path, dest: Path) -> Path:
    """The same model with its weights as ``pytorch_model.bin`` (a pickle) instead of
    safetensors: what an old or untrusted checkpoint looks like."""
    from safetensors.torch import load_file

    shutil.copytree(model_dir, dest)
    for weights in dest.glob("*.safetensors"):
        torch.save(load_file(weights), dest / "pytorch_model.bin")
        weights.unlink()
    return dest


@pytest.fixture
def pickle_model(tiny_english_path, tmp_path) -> Path:
    return _pickle_only_copy(tiny_english_path, tmp_path / "pickled")


def test_pickle_only_model_folder_is_refused(pickle_model, monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    with pytest.raises(UnsafeModelError) as caught:
        load_for_inference(str(pickle_model), torch.device("cpu"))
    message = str(caught.value)
    assert str(pickle_model) in message and "pytorch_model.bin" in message
    assert f"{ALLOW_PICKLE_ENV}=1" in message


def test_training_base_with_pickle_weights_is_refused(pickle_model, monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    with pytest.raises(UnsafeModelError, match=re.escape(str(pickle_model))):
        load_base(ModelConfig(name=str(pickle_model)), device=torch.device("cpu"))


def test_opt_in_loads_pickle_weights(pickle_model, tiny_english_path, monkeypatch):
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    model, _ = load_for_inference(str(pickle_model), torch.device("cpu"))
    reference, _ = load_for_inference(str(tiny_english_path), torch.device("cpu"))
    for (name, value), (_, expected) in zip(model.state_dict().items(),
                                            reference.state_dict().items(), strict=True):
        assert torch.equal(value, expected), name


def test_pickle_only_adapter_is_refused(tiny_english_path, tmp_path, monkeypatch):
    """peft falls back to ``adapter_model.bin`` on its own; the folder check stops it."""
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    base = WhisperForConditionalGeneration.from_pretrained(tiny_english_path)
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    out = tmp_path / "adapter"
    adapter.save_pretrained(out, safe_serialization=False)
    assert (out / "adapter_model.bin").exists() and not list(out.glob("*.safetensors"))
    with pytest.raises(UnsafeModelError, match="adapter_model.bin"):
        load_for_inference(str(out), torch.device("cpu"))


def test_safetensors_model_and_ctranslate2_folder_pass(tiny_english_path, tmp_path):
    check_model_folder(tiny_english_path)
    ct2 = tmp_path / "ct2"
    ct2.mkdir()
    (ct2 / "model.bin").write_bytes(b"CTranslate2 flat weights, not a pickle")
    check_model_folder(ct2)
    check_model_folder("openai/whisper-tiny.en")  # a hub name: from_pretrained's own check


def test_every_torch_load_in_the_project_is_weights_only():
    """transformers 5's Trainer (rng_state.pth, optimizer.pt, scheduler.pt on --resume) and peft
    already pass weights_only=True; the project's own code must too."""
    offenders = []
    for path in [*ROOT.joinpath("whisper_exp").rglob("*.py"),
                 *ROOT.joinpath("benchmarks").rglob("*.py")]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders


# --------------------------------------------------------------------------- weight hashes


def test_weight_hashes_detect_a_changed_missing_or_added_file(tiny_english_path, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_english_path, folder)
    recorded = weights_sha256(folder)
    assert list(recorded) == ["model.safetensors"]
    verify_weights(folder, recorded)

    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsMismatchError, match="model.safetensors changed"):
        verify_weights(folder, recorded)

    (folder / "extra.pt").write_bytes(b"x")
    weights.unlink()
    with pytest.raises(WeightsMismatchError) as caught:
        verify_weights(folder, recorded)
    assert "model.safetensors missing" in str(caught.value)
    assert "extra.pt not recorded" in str(caught.value)


def test_weights_digest_depends_on_names_and_hashes():
    one = weights_digest({"a.safetensors": "00", "b.safetensors": "11"})
    assert one == weights_digest({"b.safetensors": "11", "a.safetensors": "00"})
    assert one != weights_digest({"a.safetensors": "11", "b.safetensors": "00"})
    assert re.fullmatch(r"[0-9a-f]{64}", one)


def test_registered_model_records_its_weights_and_refuses_swapped_ones(tiny_english_path,
                                                                       tmp_path):
    """The version tag and the pyfunc's MLmodel metadata carry the hashes; a downloaded copy
    whose weights were changed afterwards is refused by load_context, an intact one loads."""
    import mlflow
    from mlflow.models import Model

    from whisper_exp.registry import register_run
    from whisper_exp.safety import WEIGHT_FILES_KEY

    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tiny_english_path), "model")
    version = register_run(run.info.run_id, name="hashed")
    expected = weights_sha256(tiny_english_path)
    assert version.tags["weights_sha256"] == weights_digest(expected)

    local = Path(mlflow.artifacts.download_artifacts("models:/hashed/1",
                                                     dst_path=str(tmp_path / "copy")))
    assert Model.load(str(local / "MLmodel")).metadata["whisper_exp"][WEIGHT_FILES_KEY] \
        == expected
    mlflow.pyfunc.load_model(str(local))  # intact: loads

    weights = local / "artifacts" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsMismatchError, match="model.safetensors changed"):
        mlflow.pyfunc.load_model(str(local))
