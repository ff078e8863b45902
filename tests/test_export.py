"""Export: merged Hugging Face and CTranslate2 models, faster-whisper parity with transformers,
exports logged to their source run, and clear errors for bad arguments."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from whisper_exp.audio import load_audio
from whisper_exp.cli import main
from whisper_exp.config import load_config
from whisper_exp.decoding import TranscribeError
from whisper_exp.export import (
    ExportError,
    export_model,
    is_ctranslate2_model,
    load_faster_whisper,
    transcribe_with_faster_whisper,
)
from whisper_exp.generation import transcribe_arrays
from whisper_exp.metrics import make_normalizer, score
from whisper_exp.modeling import apply_strategy, load_base, load_for_inference, save_trained

CT2_FILES = {"model.bin", "config.json", "vocabulary.json", "tokenizer.json",
             "preprocessor_config.json", "whisper_exp.json"}
# A LoRA weight the default config adapts (q_proj, v_proj), checked before and after merging.
ADAPTED_WEIGHT = "model.decoder.layers.1.self_attn.q_proj.weight"


@pytest.fixture
def experiment(tmp_path, monkeypatch) -> str:
    """An experiment whose artifacts stay under tmp_path (not ./mlruns). The active experiment
    that train()/set_experiment leave behind is restored afterwards: its id means nothing in
    the next test's fresh tracking DB."""
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    name = "export-test"
    mlflow.create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri())
    return name


def _dev_clips(dev_dir: Path, n: int = 4) -> tuple[list[np.ndarray], list[str]]:
    with (dev_dir / "metadata.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[:n]
    return [load_audio(str(dev_dir / r["file_name"])) for r in rows], \
        [r["transcription"] for r in rows]


def _transformers_greedy(model_ref: str, clips: list[np.ndarray]) -> tuple[list[str], object]:
    model, processor = load_for_inference(model_ref, torch.device("cpu"))
    return transcribe_arrays(model, processor, clips, progress=False), processor.tokenizer


def _assert_transcripts_agree(fast: list[str], slow: list[str], tokenizer) -> None:
    """int8 CTranslate2 vs fp32 transformers: same words on most clips (measured on dev: 9 of
    the first 12 identical, the rest one word apart)."""
    exact = sum(f == s for f, s in zip(fast, slow, strict=True))
    assert exact >= len(fast) - 1, list(zip(fast, slow, strict=True))
    assert score(slow, fast, make_normalizer(tokenizer)).wer <= 0.15, (fast, slow)


def _assert_same_words_up_to_the_shorter_cap(fast: list[str], slow: list[str]) -> None:
    """A model that loops to the token cap ("says the") decodes the same words in both engines
    until the shorter cap: CTranslate2's Whisper.generate stops at half its max_length
    (OpenNMT/CTranslate2#1856), transformers at max_new_tokens."""
    for fast_text, slow_text in zip(fast, slow, strict=True):
        fast_words, slow_words = fast_text.split(), slow_text.split()
        shorter = min(len(fast_words), len(slow_words))
        assert shorter >= 5, (fast_text, slow_text)
        assert fast_words[:shorter] == slow_words[:shorter], (fast_text, slow_text)


def _artifact_names(run_id: str, path: str) -> set[str]:
    return {Path(item.path).name for item in MlflowClient().list_artifacts(run_id, path)}


def test_tiny_en_ctranslate2_int8_transcribes_like_transformers(tiny_en_path, dev_dir, tmp_path):
    out = export_model(str(tiny_en_path), tmp_path / "ct2", fmt="ctranslate2",
                       quantization="int8")
    assert is_ctranslate2_model(out)
    assert {p.name for p in out.iterdir()} >= CT2_FILES
    meta = json.loads((out / "whisper_exp.json").read_text())
    assert meta["format"] == "ctranslate2" and meta["precision"] == "int8"
    assert meta["merged_adapter"] is False

    clips, references = _dev_clips(dev_dir)
    fast = transcribe_with_faster_whisper(out, clips, compute_type="int8")
    slow, tokenizer = _transformers_greedy(str(tiny_en_path), clips)
    _assert_transcripts_agree(fast, slow, tokenizer)
    assert score(references, fast, make_normalizer(tokenizer)).wer < 0.5, "it hears the speech"
    # A plain folder comes from no run: nothing is logged anywhere.
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def _expected_merge(adapter_dir: Path, base_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(base weight, base + scaling * B @ A) straight from the safetensors files, independent
    of peft's merge code."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    prefix = "base_model.model." + ADAPTED_WEIGHT.removesuffix(".weight")
    lora_a, lora_b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    base = load_file(base_dir / "model.safetensors")[ADAPTED_WEIGHT].float()
    return base, base + (config["lora_alpha"] / config["r"]) * lora_b.float() @ lora_a.float()


def _lora_run(base_dir: Path, tmp_path: Path, experiment: str) -> tuple[str, Path]:
    """A LoRA run laid out as train() leaves it (save_trained's adapter folder in
    outputs/<run_id>/model, logged as model/), with lora_B set to what one Adam step at lr 1e-3
    gives it (+-1e-3 per element): merging then visibly changes weights, without the half
    minute a real training step takes here."""
    cfg = load_config(None, {"model": {"name": str(base_dir)},
                             "finetuning": {"strategy": "lora"},
                             "training": {"output_dir": str(tmp_path / "outputs")}})
    model, processor = load_base(cfg.model, cfg.finetuning, torch.device("cpu"))
    model = apply_strategy(model, cfg.finetuning)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                signs = torch.randint(0, 2, param.shape, generator=generator) * 2 - 1
                param.copy_(signs * 1e-3)
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        model_dir = save_trained(model, processor,
                                 Path(cfg.training.output_dir) / run.info.run_id / "model", cfg)
        mlflow.log_artifacts(str(model_dir), "model")
    return run.info.run_id, model_dir


def test_lora_run_is_merged_converted_and_logged(says_the_path, sample_dir, tmp_path, experiment,
                                                  monkeypatch):
    from ctranslate2.converters import TransformersConverter

    run_id, adapter_dir = _lora_run(says_the_path, tmp_path, experiment)
    base_weight, merged_weight = _expected_merge(adapter_dir, says_the_path)
    assert (merged_weight - base_weight).abs().max() > 1e-4, "the adapter changes weights"

    # CTranslate2: the converter must be handed merged weights, not the base.
    converted = {}
    original_load = TransformersConverter.load_model

    def spy_load(self, model_class, path, **kwargs):
        converted["model"] = original_load(self, model_class, path, **kwargs)
        return converted["model"]

    monkeypatch.setattr(TransformersConverter, "load_model", spy_load)
    ct2_dir = export_model(f"runs:/{run_id}", tmp_path / "ct2", fmt="ctranslate2",
                           quantization="int8")
    weight = converted["model"].state_dict()[ADAPTED_WEIGHT]
    torch.testing.assert_close(weight, merged_weight, rtol=1e-4, atol=1e-5)
    assert json.loads((ct2_dir / "whisper_exp.json").read_text())["merged_adapter"] is True
    assert _artifact_names(run_id, "exports/ctranslate2-int8") >= CT2_FILES

    clips, _ = _dev_clips(sample_dir)
    fast = transcribe_with_faster_whisper(ct2_dir, clips)
    slow, _ = _transformers_greedy(f"runs:/{run_id}", clips)
    _assert_same_words_up_to_the_shorter_cap(fast, slow)

    # Hugging Face, from the local training folder: outputs/<run_id>/model names its run.
    hf_dir = export_model(str(adapter_dir), tmp_path / "hf", fmt="hf")
    assert not (hf_dir / "adapter_config.json").exists()
    saved = load_file(hf_dir / "model.safetensors")[ADAPTED_WEIGHT]
    assert saved.dtype == torch.float32
    torch.testing.assert_close(saved, merged_weight, rtol=1e-4, atol=1e-5)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "preprocessor_config.json"} <= _artifact_names(run_id, "exports/hf-float32")
    assert mlflow.get_run(run_id).info.status == "FINISHED", "logging left the run as it was"


def test_cli_exports_and_guards_the_output_folder(tiny_english_path, tmp_path):
    out = tmp_path / "ct2"
    args = ["export", "--model", str(tiny_english_path), "--format", "ctranslate2",
            "--quantization", "int8", "--output", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"exported={out}" in result.output
    assert is_ctranslate2_model(out)
    tone = (0.1 * np.sin(np.arange(16_000) / 10)).astype(np.float32)
    model = load_faster_whisper(out, compute_type="int8")
    assert isinstance(transcribe_with_faster_whisper(model, [tone])[0], str)

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "is not empty" in again.output
    replaced = CliRunner().invoke(main, [*args, "--overwrite", "--quantization", "float32"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "whisper_exp.json").read_text())["precision"] == "float32"


class _RecordingWhisperModel:
    """Stands in for faster_whisper.WhisperModel and the BatchedInferencePipeline that decodes
    clips with it: records how it is asked to decode (one clip: its chunk's ``seek`` is 0)."""

    class _Model:
        is_multilingual = True

    model = _Model()

    def __init__(self):
        self.calls: list[dict] = []

    def transcribe(self, audio, **options):
        from types import SimpleNamespace

        self.calls.append(options)
        return iter([SimpleNamespace(text=" Hello", seek=0),
                     SimpleNamespace(text=" there.", seek=0)]), None

    @classmethod
    def installed(cls, monkeypatch) -> _RecordingWhisperModel:
        fake = cls()
        monkeypatch.setattr("whisper_exp.ctranslate2_backend.load_faster_whisper",
                            lambda *a, **k: fake)
        monkeypatch.setattr("faster_whisper.BatchedInferencePipeline", lambda model: model)
        return fake


def _with_recorded_language(model_dir: Path, tmp_path: Path, language: str) -> Path:
    """A copy of a model folder whose whisper_exp.json says it was trained for ``language``."""
    import shutil

    copy = Path(shutil.copytree(model_dir, tmp_path / f"trained-{language}"))
    (copy / "whisper_exp.json").write_text(json.dumps({"language": language}))
    return copy


def test_multilingual_export_keeps_its_language_for_faster_whisper(tiny_multilingual_path,
                                                                   tmp_path, monkeypatch):
    german = _with_recorded_language(tiny_multilingual_path, tmp_path, "german")
    out = export_model(str(german), tmp_path / "ct2", fmt="ctranslate2")
    assert json.loads((out / "whisper_exp.json").read_text())["language"] == "german"
    assert json.loads((out / "config.json").read_text())["lang_ids"], "language ids converted"

    fake = _RecordingWhisperModel.installed(monkeypatch)
    tone = np.zeros(16_000, dtype=np.float32)
    assert transcribe_with_faster_whisper(out, [tone]) == ["Hello there."]
    assert transcribe_with_faster_whisper(fake, [tone], language="German", beam_size=4)
    assert transcribe_with_faster_whisper(out, [tone], language="en")
    default, explicit, english = fake.calls
    assert english["language"] == "en", "a request overrides the export's language"
    # The export's "german" reaches faster-whisper as the code it expects.
    assert default["language"] == "de" and explicit["language"] == "de"
    assert explicit["beam_size"] == 4
    assert default["temperature"] == 0.0 and default["without_timestamps"] is True
    assert default["vad_filter"] is False
    assert default["multilingual"] is False, "a known language is forced, not detected per clip"
    with pytest.raises(TranscribeError, match="unknown language 'klingon'"):
        transcribe_with_faster_whisper(fake, [tone], language="klingon")


def test_export_of_a_model_without_a_language_leaves_detection_on(tiny_multilingual_path,
                                                                   tmp_path, monkeypatch):
    """A multilingual checkpoint that records no language must not come out of export with
    "english" baked in: neither the merged model nor faster-whisper forces one."""
    from transformers import GenerationConfig

    from whisper_exp.export import convert_to_ctranslate2

    hf = export_model(str(tiny_multilingual_path), tmp_path / "hf", fmt="hf")
    assert json.loads((hf / "whisper_exp.json").read_text())["language"] is None
    assert GenerationConfig.from_pretrained(hf).language is None
    ct2 = convert_to_ctranslate2(hf, tmp_path / "ct2", None)
    assert json.loads((ct2 / "whisper_exp.json").read_text())["language"] is None

    fake = _RecordingWhisperModel.installed(monkeypatch)
    assert transcribe_with_faster_whisper(ct2, [np.zeros(16_000, dtype=np.float32)])
    assert fake.calls[0]["language"] is None, "faster-whisper detects the language"
    assert fake.calls[0]["multilingual"] is True, "per clip, as clip-by-clip decoding does"


@pytest.mark.parametrize("fmt, quantization, model, message", [
    ("onnx", None, "TINY", "unknown export format 'onnx'; use one of hf, ctranslate2"),
    ("hf", "int8", "TINY", "int8 weights need --format ctranslate2"),
    ("ctranslate2", "int4", "TINY", "quantization 'int4' is not available for ctranslate2"),
    ("hf", None, "{tmp}/no/such/model", "model folder .* does not exist"),
    ("hf", None, "{tmp}", "holds no Whisper model: no config.json"),
    ("hf", None, "runs:/0123456789abcdef0123456789abcdef", "not found in MLflow"),
])
def test_bad_arguments_fail_before_any_work(tiny_english_path, tmp_path, fmt, quantization,
                                            model, message):
    model_ref = str(tiny_english_path) if model == "TINY" else model.format(tmp=tmp_path)
    with pytest.raises(ExportError, match=message):
        export_model(model_ref, tmp_path / "out", fmt=fmt, quantization=quantization)
    assert not (tmp_path / "out").exists()


def test_a_non_empty_folder_that_is_no_model_is_never_deleted(tiny_english_path, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="refusing to delete"):
        export_model(str(tiny_english_path), tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(TranscribeError, match="not a CTranslate2 model"):
        load_faster_whisper(tiny_english_path)


def test_cli_rejects_int8_for_hf(tiny_english_path, tmp_path):
    result = CliRunner().invoke(main, ["export", "--model", str(tiny_english_path), "--format",
                                       "hf", "--quantization", "int8", "--output",
                                       str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "error: quantization 'int8' is not available for hf" in result.output


def test_registered_versions_and_training_folders_name_their_run(tmp_path, experiment):
    from whisper_exp.export import source_run_id

    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    client = MlflowClient()
    client.create_registered_model("whisper-exp")
    version = client.create_model_version("whisper-exp", source=f"runs:/{run_id}/model",
                                          run_id=run_id)
    client.set_registered_model_alias("whisper-exp", "champion", version.version)
    assert source_run_id("models:/whisper-exp@champion") == run_id
    assert source_run_id(f"models:/whisper-exp/{version.version}") == run_id
    assert source_run_id(f"runs:/{run_id}/model") == run_id
    trained = tmp_path / "outputs" / run_id / "model"
    trained.mkdir(parents=True)
    assert source_run_id(str(trained)) == run_id
    unknown = tmp_path / "outputs" / ("f" * 32) / "model"
    unknown.mkdir(parents=True)
    assert source_run_id(str(unknown)) is None
    assert source_run_id("models:/no-such-model@champion") is None


def _run_with_eval_rows(model_dir: Path, sample_dir: Path, tmp_path: Path,
                        n: int = 3) -> tuple[str, Path]:
    """A finished run laid out as train() leaves it: params naming its data, the model in
    outputs/<run_id>/model, and eval/predictions.csv listing eval files with references."""
    import shutil

    with (sample_dir / "metadata.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[:n]
    with mlflow.start_run() as run:
        mlflow.log_params({"data.train": str(sample_dir), "data.eval": "None"})
        lines = ["file,reference,hypothesis,wer"] + [
            f"{r['file_name']},{r['transcription']},,1.0" for r in rows]
        mlflow.log_text("\n".join(lines) + "\n", "eval/predictions.csv")
        mlflow.log_metric("wer", 1.0)
    trained = Path(shutil.copytree(model_dir, tmp_path / "outputs" / run.info.run_id / "model"))
    return run.info.run_id, trained


def test_an_export_is_scored_on_its_run_s_eval_clips_beside_the_source(says_the_path, sample_dir,
                                                                      tmp_path):
    run_id, trained = _run_with_eval_rows(says_the_path, sample_dir, tmp_path)
    result = CliRunner().invoke(main, ["export", "--model", str(trained), "--output",
                                       str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert metrics["export_wer/hf-float32"] == metrics["export_wer/source"] > 0.5
    assert metrics["wer"] == 1.0, "the run's own wer stays beside it"
    check = json.loads((tmp_path / "hf" / "whisper_exp.json").read_text())["export_check"]
    assert check["clips"] == 3 and check["clips_from"] == f"runs:/{run_id}/eval/predictions.csv"
    assert f"export_wer={check['export_wer']:.4f}" in result.output


def test_a_far_worse_export_is_refused_and_nothing_is_logged(says_the_path, sample_dir, tmp_path,
                                                             monkeypatch):
    run_id, trained = _run_with_eval_rows(says_the_path, sample_dir, tmp_path, n=2)
    monkeypatch.setattr("whisper_exp.export_check.export_transcripts",
                        lambda fmt, output, audios: ["broken " * 100] * len(audios))
    args = ["export", "--model", str(trained), "--output", str(tmp_path / "hf")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2, refused.output
    assert "error: refused the hf-float32 export" in refused.output
    assert "--force" in refused.output
    assert not (tmp_path / "hf").exists(), "a refused export is removed"
    assert not MlflowClient().list_artifacts(run_id, "exports")
    assert not any(k.startswith("export_wer") for k in MlflowClient().get_run(run_id).data.metrics)

    lenient = CliRunner().invoke(main, [*args, "--max-wer-increase", "1000"])
    assert lenient.exit_code == 0, lenient.output
    forced = CliRunner().invoke(main, [*args, "--overwrite", "--force"])
    assert forced.exit_code == 0, forced.output
    assert json.loads((tmp_path / "hf" / "whisper_exp.json").read_text())[
        "export_check"]["forced"] is True
    assert MlflowClient().get_run(run_id).data.metrics["export_wer/hf-float32"] > 10


def test_ctranslate2_export_is_checked_in_faster_whisper(says_the_path, sample_dir, tmp_path):
    """The check decodes the export in its own engine: faster-whisper stops "says the" at half
    the token budget (CTranslate2's Whisper.generate caps at max_length / 2,
    OpenNMT/CTranslate2#1856), fewer insertions than transformers, never more."""
    run_id, trained = _run_with_eval_rows(says_the_path, sample_dir, tmp_path, n=2)
    result = CliRunner().invoke(main, ["export", "--model", str(trained), "--format",
                                       "ctranslate2", "--quantization", "int8", "--output",
                                       str(tmp_path / "ct2")])
    assert result.exit_code == 0, result.output
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert 0 < metrics["export_wer/ctranslate2-int8"] <= metrics["export_wer/source"]
    assert "README.md" in _artifact_names(run_id, "exports/ctranslate2-int8")


def test_check_data_is_used_and_a_model_without_clips_is_exported_with_a_note(
        says_the_path, sample_dir, tmp_path):
    noted = CliRunner().invoke(main, ["export", "--model", str(says_the_path), "--output",
                                      str(tmp_path / "plain")])
    assert noted.exit_code == 0, noted.output
    assert "note: export not checked" in noted.output
    checked = CliRunner().invoke(main, ["export", "--model", str(says_the_path), "--output",
                                        str(tmp_path / "checked"), "--check-data",
                                        str(sample_dir), "--check-clips", "2"])
    assert checked.exit_code == 0, checked.output
    check = json.loads((tmp_path / "checked" / "whisper_exp.json").read_text())["export_check"]
    assert check["clips"] == 2 and check["clips_from"] == str(sample_dir)


def test_ctranslate2_export_carries_what_openai_compatible_servers_load(tiny_english_path,
                                                                        tmp_path):
    import yaml

    out = export_model(str(tiny_english_path), tmp_path / "ct2", fmt="ctranslate2",
                       quantization="int8")
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    front_matter = yaml.safe_load(card.split("---\n")[1])
    assert front_matter["library_name"] == "ctranslate2"
    assert front_matter["license"] == "apache-2.0" and front_matter["language"] == ["en"]
    assert {"audio", "automatic-speech-recognition"} <= set(front_matter["tags"])
    assert {"tokenizer.json", "preprocessor_config.json", "model.bin"} <= {
        p.name for p in out.iterdir()}
