"""The ctranslate2 serving backend: a registered CTranslate2 (int8) export answered by
faster-whisper through the same pyfunc, with the same request validation as the transformers
backend; plus the transformers inference settings (SDPA attention) it is compared with."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from servers import b64, wav_bytes

from whisper_exp.audio import SAMPLE_RATE, load_audio
from whisper_exp.cli import main
from whisper_exp.ctranslate2_backend import is_ctranslate2_model
from whisper_exp.decoding import DecodeOptions, TranscribeError
from whisper_exp.metrics import english_normalizer, score
from whisper_exp.modeling import load_for_inference, resolve_model_reference
from whisper_exp.registry import RegistryError, register_run
from whisper_exp.transcribe import Transcriber

N_CLIPS = 6


@pytest.fixture(autouse=True)
def _experiment_in_tmp(tmp_path):
    """Registered models are full checkpoints: keep their artifacts in tmp_path."""
    mlflow.create_experiment("ct2-test", artifact_location=(tmp_path / "ct2-test").as_uri())
    mlflow.set_experiment("ct2-test")


def _errors(model, request: pd.DataFrame, params: dict | None = None) -> str:
    with pytest.raises(MlflowException) as caught:
        model.predict(request, params=params)
    assert caught.value.get_http_status_code() == 400
    return caught.value.message


def test_registered_int8_export_serves_like_the_transformers_backend(tiny_en_path, dev_dir):
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tiny_en_path), "model")
        mlflow.log_metric("wer", 0.25)
    run_id = run.info.run_id
    register_run(run_id, alias="reference")  # the default backend
    cli = CliRunner().invoke(main, ["register", "--run", run_id, "--alias", "fast",
                                    "--backend", "ctranslate2", "--quantization", "int8"])
    assert cli.exit_code == 0, cli.output
    assert "registered=whisper-exp version=2 alias=fast" in cli.output

    version = MlflowClient().get_model_version_by_alias("whisper-exp", "fast")
    assert (version.tags["backend"], version.tags["precision"]) == ("ctranslate2", "int8")
    assert version.tags["packaging"] == "ctranslate2 int8" and version.tags["wer"] == "0.25"
    local = Path(resolve_model_reference("models:/whisper-exp@fast"))
    assert is_ctranslate2_model(local) and not (local / "model.safetensors").exists()
    requirements = {re.split("==", r)[0]
                    for r in (local.parent.parent / "requirements.txt").read_text().split()}
    assert {"ctranslate2", "faster-whisper", "soundfile", "soxr", "mlflow"} <= requirements
    assert "torch" not in requirements and "peft" not in requirements
    # transformers-only code paths say what the folder is instead of failing inside HF.
    with pytest.raises(TranscribeError, match="runs in faster-whisper"):
        Transcriber.load("models:/whisper-exp@fast")

    rows = list(csv.DictReader((dev_dir / "metadata.csv").open(encoding="utf-8")))
    pause = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    joined: list[np.ndarray] = []
    while sum(len(c) + len(pause) for c in joined) <= 31 * SAMPLE_RATE:  # past one window
        joined.append(load_audio(dev_dir / rows[len(joined)]["file_name"]))
    recording = np.concatenate([x for clip in joined for x in (clip, pause)])
    request = pd.DataFrame({"audio": [
        *(b64((dev_dir / row["file_name"]).read_bytes()) for row in rows[:N_CLIPS]),  # flac
        b64(wav_bytes(recording)),
    ]})

    fast = mlflow.pyfunc.load_model("models:/whisper-exp@fast")
    output = fast.predict(request, params={"return_timestamps": True})
    assert list(output.columns) == ["text", "segments"] and len(output) == N_CLIPS + 1
    normalize = english_normalizer()
    references = [row["transcription"] for row in rows[:N_CLIPS]]
    texts = list(output["text"][:N_CLIPS])
    assert score(references, texts, normalize).wer < 0.35, texts
    long_reference = " ".join(row["transcription"] for row in rows[:len(joined)])
    assert score([long_reference], [output["text"][N_CLIPS]], normalize).wer < 0.45
    segments = output["segments"][N_CLIPS]
    assert set(segments[0]) == {"start", "end", "text"}
    assert 30 < segments[-1]["end"] <= len(recording) / SAMPLE_RATE, "long-form to the end"
    assert all(len(s) >= 1 and s[0]["end"] > 0 for s in output["segments"][:N_CLIPS])
    plain = fast.predict(request.iloc[:1])
    assert list(plain.columns) == ["text"] and plain["text"][0] == texts[0]

    reference = mlflow.pyfunc.load_model("models:/whisper-exp@reference")
    slow = list(reference.predict(request.iloc[:N_CLIPS])["text"])
    same = sum(f == s for f, s in zip(texts, slow, strict=True))
    assert same >= N_CLIPS - 2, list(zip(texts, slow, strict=True))  # int8 vs fp32 weights
    assert score(slow, texts, normalize).wer <= 0.15

    # Bad requests: the same 400 and message from either backend.
    one_clip = request.iloc[:1]
    bad = [
        (pd.DataFrame({"audio": ["this is *not* base64!"]}), None,
         "row 0: 'audio' is not valid base64"),
        (pd.DataFrame({"audio": [b64(b"just some text")]}), None,
         "row 0: not a readable audio file"),
        (pd.DataFrame({"audio": [""]}), None, "row 0: 'audio' is empty"),
        (one_clip, {"num_beams": 17}, "num_beams must be between 1 and 16, got 17"),
        (one_clip, {"max_new_tokens": 1000}, "max_new_tokens must be between 1 and 444"),
        (one_clip, {"language": "german"}, "the model is English-only"),
    ]
    for frame, params, message in bad:
        from_fast, from_reference = _errors(fast, frame, params), _errors(reference, frame, params)
        assert message in from_fast and from_fast == from_reference
    assert fast.predict(one_clip, params={"language": "en", "max_new_tokens": 5})["text"][0]

    # It runs in the precision it was exported with.
    assert fast.unwrap_python_model().transcriber.model.model.compute_type.startswith("int8")


def test_backend_options_are_checked_before_any_work():
    run_id = "0" * 32  # does not exist: each error below comes before the run is looked up
    for kwargs, message in [
        ({"backend": "onnx"}, "unknown backend 'onnx'; use one of transformers, ctranslate2"),
        ({"quantization": "int8"}, "quantization 'int8' needs backend ctranslate2"),
        ({"backend": "ctranslate2", "quantization": "int4"},
         "quantization 'int4' is not available for ctranslate2"),
        ({"backend": "ctranslate2", "adapter_only": True}, "needs the merged model"),
    ]:
        with pytest.raises(RegistryError, match=re.escape(message)):
            register_run(run_id, **kwargs)
    result = CliRunner().invoke(main, ["register", "--run", run_id, "--backend", "ctranslate2",
                                       "--quantization", "int4"])
    assert result.exit_code == 2 and "error: quantization 'int4'" in result.stderr


def test_inference_loads_with_sdpa_attention(tiny_english_path):
    """Batched greedy decoding (evaluate, transcribe, the transformers backend) runs on
    PyTorch's scaled-dot-product attention kernels; transformers 5 picks them by default."""
    model, _ = load_for_inference(str(tiny_english_path))
    assert model.config._attn_implementation == "sdpa"
    assert model.model.encoder.layers[0].self_attn.config._attn_implementation == "sdpa"



@pytest.mark.parametrize("num_beams", [1, 2])
def test_batched_decoding_matches_clip_by_clip(tiny_english_path, tmp_path, monkeypatch,
                                               num_beams):
    """Clips up to 30 s go through faster-whisper's BatchedInferencePipeline, several per
    encoder/decoder pass, with the transcripts the one-clip-at-a-time loop gives: mixed lengths
    (a clip under one mel hop, padded to a window like the rest; a full 30 s window), greedy
    and beam search. (The random
    "multilingual" test model has an English tokenizer, which CTranslate2 takes for English-only,
    so language handling is checked in test_export with a recording stand-in.)"""
    from faster_whisper import BatchedInferencePipeline

    from whisper_exp.ctranslate2_backend import (
        FasterWhisperTranscriber,
        decode_with_faster_whisper,
    )
    from whisper_exp.decoding import DecodeOptions
    from whisper_exp.export import export_model

    out = export_model(str(tiny_english_path), tmp_path / "ct2", fmt="ctranslate2",
                       log_to_run=False)
    transcriber = FasterWhisperTranscriber.load(out)
    rng = np.random.default_rng(0)
    seconds = [1.3, 0.005, 4.2, 0.5, 30.0, 2.0, 7.7]
    clips = [(0.1 * rng.standard_normal(int(s * SAMPLE_RATE))).astype(np.float32)
             for s in seconds]
    passes = []
    original = BatchedInferencePipeline.transcribe

    def counted(self, *args, **kwargs):
        passes.append(len(kwargs["clip_timestamps"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BatchedInferencePipeline, "transcribe", counted)
    options = DecodeOptions(batch_size=3, max_new_tokens=12, num_beams=num_beams)
    batched = [d.text for d in transcriber.transcribe_audio(clips, options)]
    assert passes == [3, 3, 1], "seven clips decoded three at a time"
    one_by_one = [decode_with_faster_whisper(transcriber.model, clip, beam_size=num_beams,
                                             max_new_tokens=12).text for clip in clips]
    assert batched == one_by_one
    assert sum(bool(text) for text in one_by_one) >= 4, "the random model does emit text"


@pytest.fixture(scope="module")
def says_the_ct2(says_the_path, tmp_path_factory) -> Path:
    """The says-the model (" the" at every step) exported to CTranslate2 (float32)."""
    from whisper_exp.export import export_model

    return export_model(str(says_the_path), tmp_path_factory.mktemp("says-ct2") / "ct2",
                        fmt="ctranslate2", log_to_run=False)


@pytest.mark.parametrize("timestamps", [False, True])
def test_ct2_backend_decodes_the_whole_token_budget(says_the_path, says_the_ct2, timestamps):
    """A model that never stops runs to its token budget: the same number of tokens from both
    backends, batched or clip by clip. (CTranslate2's Whisper decodes only max_length // 2
    tokens, so faster-whisper's max_length = prompt + budget gave about half.)"""
    from whisper_exp.ctranslate2_backend import FasterWhisperTranscriber, load_faster_whisper

    clip = np.zeros(3 * SAMPLE_RATE, dtype=np.float32)
    budget = 60
    options = DecodeOptions(max_new_tokens=budget, return_timestamps=timestamps)
    fast = FasterWhisperTranscriber.load(says_the_ct2).transcribe_audio([clip, clip], options)
    slow = Transcriber.load(str(says_the_path)).transcribe_audio([clip], options)
    # With timestamps both engines spend the first token on the opening <|0.00|>.
    assert [len(d.text.split()) for d in slow] == [budget - timestamps]
    assert [len(d.text.split()) for d in fast] == [budget - timestamps] * 2
    # The widened max_length never moves the budget past the decoder's 448 positions.
    model = load_faster_whisper(says_the_ct2)
    from whisper_exp.ctranslate2_backend import decode_with_faster_whisper

    assert len(decode_with_faster_whisper(model, clip, max_new_tokens=444).text.split()) == 444


def test_ct2_backend_feeds_transformers_features(says_the_ct2, tiny_english_path, sample_dir):
    """Clips up to 30 s reach the CTranslate2 encoder as the log-mel of the clip padded with
    silence to 30 s, i.e. WhisperFeatureExtractor's features (what models are fine-tuned on),
    clip by clip, batched and with word timestamps; not faster-whisper's zero-padded log-mel."""
    from faster_whisper import WhisperModel
    from transformers import WhisperFeatureExtractor

    from whisper_exp.ctranslate2_backend import FasterWhisperTranscriber

    clip = load_audio(sample_dir / "001350134.flac")
    expected = WhisperFeatureExtractor.from_pretrained(tiny_english_path)(
        clip, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
    fed: list[np.ndarray] = []
    original = WhisperModel.encode

    def spy(self, features):
        fed.append(np.asarray(features).reshape(-1, *expected.shape)[0])
        return original(self, features)

    transcriber = FasterWhisperTranscriber.load(says_the_ct2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WhisperModel, "encode", spy)
        for options in (DecodeOptions(max_new_tokens=4),
                        DecodeOptions(max_new_tokens=4, return_timestamps=True),
                        DecodeOptions(max_new_tokens=4, word_timestamps=True)):
            fed.clear()
            decoded = transcriber.transcribe_audio([clip], options)[0]
            assert all(s.end <= len(clip) / SAMPLE_RATE for s in decoded.segments)
            assert decoded.text.startswith("the"), options
            # The clip's window (a window faster-whisper seeks to after it is discarded).
            np.testing.assert_allclose(fed[0], expected, atol=1e-4)
    old = FasterWhisperTranscriber.load(says_the_ct2, pad=False)
    fed.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WhisperModel, "encode", spy)
        old.transcribe_audio([clip], DecodeOptions(max_new_tokens=4))
    assert not np.allclose(fed[0], expected, atol=1e-2), "faster-whisper's own padding differs"
