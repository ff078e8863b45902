"""whisper.cpp (GGML) export: the file layout whisper.cpp's loader reads, ggml's own quantisers
byte for byte, whisper.cpp (through pywhispercpp) decoding the export, the export logged to its
run, and real tiny.en transcribing dev clips like transformers."""

from __future__ import annotations

import csv
import ctypes
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import teach_to_say_the

from whisper_exp.audio import load_audio
from whisper_exp.cli import main
from whisper_exp.export import ExportError, export_model
from whisper_exp.ggml_export import (
    GGMLExportError,
    convert_to_ggml,
    load_whisper_cpp,
    quantize_q5_0,
    quantize_q8_0,
    read_ggml_file,
    transcribe_with_whisper_cpp,
)

GGML_TYPES = {"f32": 0, "f16": 1, "q5_0": 6, "q8_0": 8}


def _whisper_cpp_tensor_names(n_audio_layer: int, n_text_layer: int) -> set[str]:
    """The tensors whisper.cpp's loader creates and requires, written out by hand from
    whisper_model_load (not from the converter's mapping)."""
    names = {"encoder.positional_embedding", "encoder.conv1.weight", "encoder.conv1.bias",
             "encoder.conv2.weight", "encoder.conv2.bias", "encoder.ln_post.weight",
             "encoder.ln_post.bias", "decoder.positional_embedding",
             "decoder.token_embedding.weight", "decoder.ln.weight", "decoder.ln.bias"}
    attention = ["query.weight", "query.bias", "key.weight", "value.weight", "value.bias",
                 "out.weight", "out.bias"]
    block = ["mlp_ln.weight", "mlp_ln.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
             "mlp.2.bias", "attn_ln.weight", "attn_ln.bias", *(f"attn.{a}" for a in attention)]
    cross = ["cross_attn_ln.weight", "cross_attn_ln.bias",
             *(f"cross_attn.{a}" for a in attention)]
    names |= {f"encoder.blocks.{i}.{t}" for i in range(n_audio_layer) for t in block}
    names |= {f"decoder.blocks.{i}.{t}" for i in range(n_text_layer) for t in block + cross}
    return names


@pytest.fixture(scope="module")
def cpp_says_the(tiny_english_path, tmp_path_factory) -> Path:
    """A tiny random Whisper shaped as whisper.cpp builds every model (feed-forward 4 x d_model;
    conftest's tiny models are 2 x) that says " the" at every step, as conftest's says_the
    does: its transcript in any engine is known, and only right if the final layer norm, the
    token embedding and the vocabulary all reach whisper.cpp intact."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    config = WhisperConfig.from_pretrained(tiny_english_path)
    config.encoder_ffn_dim = config.decoder_ffn_dim = 4 * config.d_model
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_pretrained(tiny_english_path)
    processor = WhisperProcessor.from_pretrained(tiny_english_path)
    teach_to_say_the(model, processor)
    out = tmp_path_factory.mktemp("models") / "cpp-says-the"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def cpp_says_the_f16(cpp_says_the, tmp_path_factory) -> Path:
    return convert_to_ggml(cpp_says_the, tmp_path_factory.mktemp("ggml") / "model-f16.bin")


def test_file_has_the_layout_whisper_cpp_reads(cpp_says_the, cpp_says_the_f16):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    parsed = read_ggml_file(cpp_says_the_f16)
    config = WhisperConfig.from_pretrained(cpp_says_the)
    assert parsed.hparams == {
        "n_vocab": 51864, "n_audio_ctx": 1500, "n_audio_state": 64, "n_audio_head": 2,
        "n_audio_layer": 2, "n_text_ctx": 448, "n_text_state": 64, "n_text_head": 2,
        "n_text_layer": 2, "n_mels": 80, "ftype": 1}
    assert config.vocab_size == parsed.hparams["n_vocab"]
    filters = WhisperFeatureExtractor.from_pretrained(cpp_says_the).mel_filters
    np.testing.assert_array_equal(parsed.mel_filters, filters.T.astype(np.float32))
    assert parsed.mel_filters.shape == (80, 201)
    # GPT-2 byte decoding: "Ġthe" is the raw bytes " the"; the last BPE token is end-of-text.
    assert len(parsed.vocabulary) == 50257
    assert parsed.vocabulary[262] == b" the" and parsed.vocabulary[50256] == b"<|endoftext|>"
    assert parsed.vocabulary[198] == b"\n"

    assert set(parsed.tensors) == _whisper_cpp_tensor_names(2, 2)
    types = {name: tensor.ggml_type for name, tensor in parsed.tensors.items()}
    assert types["decoder.blocks.1.attn.query.weight"] == GGML_TYPES["f16"]
    assert types["decoder.token_embedding.weight"] == GGML_TYPES["f16"]
    assert types["encoder.conv1.weight"] == GGML_TYPES["f16"]
    for f32_name in ("encoder.conv1.bias", "encoder.positional_embedding",
                     "decoder.positional_embedding", "decoder.ln.bias",
                     "encoder.blocks.0.attn.query.bias"):
        assert types[f32_name] == GGML_TYPES["f32"], f32_name
    assert parsed.tensors["encoder.conv1.bias"].shape == (64, 1)
    assert parsed.tensors["encoder.conv1.weight"].shape == (64, 80, 3)
    assert parsed.tensors["decoder.blocks.0.mlp.0.weight"].shape == (256, 64)

    model = WhisperForConditionalGeneration.from_pretrained(cpp_says_the)
    query = parsed.tensors["decoder.blocks.1.cross_attn.query.weight"]
    with cpp_says_the_f16.open("rb") as handle:
        handle.seek(query.offset)
        stored = np.frombuffer(handle.read(2 * 64 * 64), dtype="<f2").reshape(query.shape)
    expected = model.model.decoder.layers[1].encoder_attn.q_proj.weight.detach().numpy()
    np.testing.assert_allclose(stored, expected, rtol=1e-3, atol=1e-4)


def _ggml_quantize(kind: str, values: np.ndarray) -> bytes:
    """ggml's own quantiser (ggml_quantize_chunk in the libggml-base that pywhispercpp ships)."""
    import pywhispercpp

    libs = Path(pywhispercpp.__file__).parent.parent / "pywhispercpp.libs"
    candidates = sorted(libs.glob("libggml-base*.so*")) or sorted(
        Path(pywhispercpp.__file__).parent.parent.glob("libggml-base.so*"))
    assert candidates, f"pywhispercpp ships libggml-base (looked in {libs})"
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    rows, per_row = values.shape
    source = np.ascontiguousarray(values, dtype=np.float32)
    out = ctypes.create_string_buffer(2 * rows * per_row)  # more than either format needs
    size = lib.ggml_quantize_chunk(GGML_TYPES[kind], source.ctypes.data, out, 0, rows, per_row,
                                   None)
    return out.raw[:size]


@pytest.mark.parametrize("kind, quantize", [("q8_0", quantize_q8_0), ("q5_0", quantize_q5_0)])
def test_quantisers_write_ggml_s_bytes(kind, quantize):
    rng = np.random.default_rng(0)
    values = rng.normal(scale=0.05, size=(6, 128)).astype(np.float32)
    values[1, :32] = 0.0  # an all-zero block: scale 0
    values[2, :32] = np.linspace(-1, 1, 32)  # ties between +max and -max
    values[3, 32:64] = np.round(values[3, 32:64] * 127 / np.abs(values[3, 32:64]).max()) / 254
    values[4, :] = rng.normal(scale=3.0, size=128)
    ours = quantize(values)
    assert ours == _ggml_quantize(kind, values)
    assert len(ours) == 6 * 128 // 32 * (34 if kind == "q8_0" else 22)


def says_the_in_transformers(model_dir: Path, clip: np.ndarray) -> str:
    from whisper_exp.generation import transcribe_arrays
    from whisper_exp.modeling import load_for_inference

    model, processor = load_for_inference(str(model_dir), torch.device("cpu"))
    (text,) = transcribe_arrays(model, processor, [clip], progress=False)
    assert text.split()[:3] == ["the", "the", "the"]
    return text


@pytest.mark.parametrize("precision", ["f16", "q8_0", "q5_0"])
def test_whisper_cpp_loads_the_export_and_says_what_the_model_says(cpp_says_the, cpp_says_the_f16,
                                                                   tmp_path, sample_dir,
                                                                   precision):
    model_file = cpp_says_the_f16 if precision == "f16" else convert_to_ggml(
        cpp_says_the, tmp_path / f"model-{precision}.bin", precision)
    parsed = read_ggml_file(model_file)
    assert parsed.hparams["ftype"] % 1000 == {"f16": 1, "q8_0": 7, "q5_0": 8}[precision]
    assert parsed.tensors["decoder.blocks.0.mlp.0.weight"].ggml_type == GGML_TYPES[precision]
    assert parsed.tensors["encoder.conv2.weight"].ggml_type == GGML_TYPES["f16"]

    model = load_whisper_cpp(model_file)
    clip = load_audio(str(sample_dir / _dev_rows(sample_dir, 1)[0]["file_name"]))
    (text,) = transcribe_with_whisper_cpp(model, [clip])
    assert text == says_the_in_transformers(cpp_says_the, clip), "same words, same token cap"
    (capped,) = transcribe_with_whisper_cpp(model, [clip], max_new_tokens=7)
    assert capped == "the the the the the the the"


def test_a_model_whisper_cpp_cannot_build_is_refused(tiny_english_path, tmp_path):
    """conftest's tiny models have feed-forward layers 2 x d_model: whisper.cpp would reject the
    file after reading it, and its Python bindings crash the process on that failed load."""
    with pytest.raises(GGMLExportError, match="4 x d_model"):
        convert_to_ggml(tiny_english_path, tmp_path / "model.bin")
    assert not (tmp_path / "model.bin").exists()
    with pytest.raises(ExportError, match="4 x d_model"):
        export_model(str(tiny_english_path), tmp_path / "out", fmt="ggml")
    (tmp_path / "not-ggml.bin").write_bytes(b"\0" * 64)
    with pytest.raises(GGMLExportError, match="not a GGML model"):
        load_whisper_cpp(tmp_path / "not-ggml.bin")


def test_ggml_export_of_a_run_is_checked_logged_and_guarded(cpp_says_the, sample_dir,
                                                            tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    with mlflow.start_run() as run:
        pass
    trained = tmp_path / "outputs" / run.info.run_id / "model"
    import shutil

    shutil.copytree(cpp_says_the, trained)
    out = tmp_path / "ggml"
    args = ["export", "--model", str(trained), "--format", "ggml", "--quantization", "q8_0",
            "--output", str(out)]
    result = CliRunner().invoke(main, [*args, "--check-data", str(sample_dir), "--check-clips",
                                       "1"])
    assert result.exit_code == 0, result.output
    metrics = MlflowClient().get_run(run.info.run_id).data.metrics
    assert metrics["export_wer/ggml-q8_0"] == metrics["export_wer/source"] > 0, \
        "whisper.cpp decodes the words transformers does"
    assert {p.name for p in out.iterdir()} == {"ggml-model-q8_0.bin", "whisper_exp.json"}
    meta = json.loads((out / "whisper_exp.json").read_text())
    assert meta["format"] == "ggml" and meta["precision"] == "q8_0"
    assert meta["model_file"] == "ggml-model-q8_0.bin" and meta["merged_adapter"] is False
    logged = {Path(a.path).name for a in
              MlflowClient().list_artifacts(run.info.run_id, "exports/ggml-q8_0")}
    assert logged == {"ggml-model-q8_0.bin", "whisper_exp.json"}

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "is not empty" in again.output
    bad = CliRunner().invoke(main, [*args[:-4], "--quantization", "q4_k", "--output",
                                    str(tmp_path / "other")])
    assert bad.exit_code == 2 and "not available for ggml" in bad.output


def _dev_rows(dev_dir: Path, n: int) -> list[dict[str, str]]:
    with (dev_dir / "metadata.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))[:n]


def test_tiny_en_ggml_transcribes_dev_like_transformers(tiny_en_path, dev_dir, tmp_path):
    """Real tiny.en, f16 in whisper.cpp vs fp32 in transformers, first 20 dev clips: measured
    identical transcripts on all 20 (WER between them 0.0; both 0.175 against the references).
    Measured the same way: q8_0 identical on 20 of 20 (43.6 MB vs 77.7 MB); q5_0 (29.9 MB)
    identical on 14, WER 0.111 between the engines, 0.168 against the references."""
    from whisper_exp.generation import transcribe_arrays
    from whisper_exp.metrics import make_normalizer, score
    from whisper_exp.modeling import load_for_inference

    out = export_model(str(tiny_en_path), tmp_path / "ggml", fmt="ggml")
    rows = _dev_rows(dev_dir, 20)
    clips = [load_audio(str(dev_dir / row["file_name"])) for row in rows]
    references = [row["transcription"] for row in rows]
    cpp = transcribe_with_whisper_cpp(out / "ggml-model-f16.bin", clips)
    model, processor = load_for_inference(str(tiny_en_path), torch.device("cpu"))
    reference_engine = transcribe_arrays(model, processor, clips, progress=False)
    normalizer = make_normalizer(processor.tokenizer)
    identical = sum(a == b for a, b in zip(cpp, reference_engine, strict=True))
    assert identical >= 18, list(zip(cpp, reference_engine, strict=True))
    assert score(reference_engine, cpp, normalizer).wer <= 0.02
    cpp_wer = score(references, cpp, normalizer).wer
    hf_wer = score(references, reference_engine, normalizer).wer
    assert abs(cpp_wer - hf_wer) <= 0.01, (cpp_wer, hf_wer)
