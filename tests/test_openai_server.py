"""``whisper-exp serve``: OpenAI's transcription API, driven by the official ``openai`` client
against real server processes (transformers and CTranslate2 backends), plus word timestamps in
``transcribe``, the served pyfunc and both backends."""

from __future__ import annotations

import json
import re
import statistics
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import openai
import pytest
import requests
from click.testing import CliRunner
from servers import running, wav_bytes

from whisper_exp.audio import SAMPLE_RATE, load_audio
from whisper_exp.cli import main
from whisper_exp.decoding import Decoded, DecodeOptions

API_KEY = "test-key"
CLIP = "001350134.flac"  # 2.31 s: "he is a big boy"


def _export_ct2(model_dir: Path, out: Path) -> Path:
    from whisper_exp.export import export_model

    return export_model(str(model_dir), out, fmt="ctranslate2", log_to_run=False)


@pytest.fixture(scope="module", params=["transformers", "ctranslate2"])
def server(request, says_the_path, tmp_path_factory):
    """One server per backend for the module: the says-the model (or its CTranslate2 export),
    a 1 MB upload limit and a 300 ms batching window so concurrent test clients batch."""
    folder = tmp_path_factory.mktemp(f"serve-{request.param}")
    model = says_the_path if request.param == "transformers" else \
        _export_ct2(says_the_path, folder / "ct2")
    args = ["whisper_exp.cli", "serve", str(model), "--api-key", API_KEY,
            "--max-upload-mb", "1", "--batch-wait-ms", "300", "--max-batch-size", "8",
            "--served-model-name", "says-the"]
    with running(args, folder / "server.log", cwd=folder) as (url, _process):
        yield SimpleNamespace(url=url, backend=request.param,
                              client=openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY,
                                                   max_retries=0, timeout=120))


def _clip(sample_dir: Path) -> tuple[bytes, float]:
    data = (sample_dir / CLIP).read_bytes()
    return data, len(load_audio(data)) / SAMPLE_RATE


def _create(server, sample_dir, **kwargs):
    data, _ = _clip(sample_dir)
    return server.client.audio.transcriptions.create(
        file=(CLIP, data), model="says-the", **kwargs)


def _check_words(words: list, text: str, duration: float) -> None:
    """Ordered, inside the audio, and together the transcript."""
    starts = [w["start"] for w in words]
    assert words and starts == sorted(starts)
    assert all(0 <= w["start"] <= w["end"] <= duration + 1e-6 for w in words)
    assert " ".join(w["word"] for w in words).split() == text.split()


def test_health_and_models(server):
    health = requests.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["backend"] == server.backend
    assert [m.id for m in server.client.models.list()] == ["says-the"]


def test_every_response_format(server, sample_dir):
    _, duration = _clip(sample_dir)
    assert _create(server, sample_dir).text.split()[:3] == ["the", "the", "the"]
    text = _create(server, sample_dir, response_format="text")
    assert isinstance(text, str) and text.split()[0] == "the"
    srt = _create(server, sample_dir, response_format="srt")
    assert re.match(r"1\n00:00:0\d,\d{3} --> 00:00:0\d,\d{3}\nthe the", srt), srt
    vtt = _create(server, sample_dir, response_format="vtt")
    assert re.match(r"WEBVTT\n\n00:00:0\d.\d{3} --> 00:00:0\d.\d{3}\nthe the", vtt), vtt
    verbose = _create(server, sample_dir, response_format="verbose_json")
    assert verbose.task == "transcribe" and verbose.language == "english"
    assert abs(verbose.duration - duration) < 0.01 and verbose.text.startswith("the")
    segment = verbose.segments[0]
    assert segment.id == 0 and 0 <= segment.start < segment.end <= duration
    assert segment.text.startswith("the") and segment.tokens and segment.temperature == 0.0
    if server.backend == "ctranslate2":  # faster-whisper reports the decoder's statistics
        assert segment.avg_logprob < 0 and segment.compression_ratio > 0
        assert 0 <= segment.no_speech_prob <= 1
    assert verbose.words is None, "words only when asked for"


def test_word_and_segment_timestamps(server, sample_dir):
    _, duration = _clip(sample_dir)
    both = _create(server, sample_dir, response_format="verbose_json",
                   timestamp_granularities=["word", "segment"])
    assert both.segments
    _check_words([w.model_dump() for w in both.words], both.text, duration)
    words_only = _create(server, sample_dir, response_format="verbose_json",
                         timestamp_granularities=["word"])
    assert words_only.segments is None and words_only.words


def test_prompt_is_accepted(server, sample_dir):
    """That the prompt reaches the decoder is checked per backend below and on real tiny.en."""
    assert _create(server, sample_dir, prompt="Names: Kenobi.").text.startswith("the")


@pytest.mark.parametrize(("kwargs", "param", "fragment"), [
    ({"response_format": "json", "timestamp_granularities": ["word"]},
     "timestamp_granularities", "verbose_json"),
    ({"response_format": "docx"}, "response_format", "not supported"),
    ({"temperature": 1.5}, "temperature", "between 0 and 1"),
    ({"language": "de"}, "language", "English-only"),
])
def test_bad_form_is_a_400_in_openais_shape(server, sample_dir, kwargs, param, fragment):
    with pytest.raises(openai.BadRequestError) as caught:
        _create(server, sample_dir, **kwargs)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and fragment in error["message"]


def test_wrong_or_missing_key_is_a_401(server, sample_dir):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.audio.transcriptions.create(file=(CLIP, b"RIFF"), model="says-the")
    assert caught.value.body["code"] == "invalid_api_key"
    answer = requests.post(f"{server.url}/v1/audio/transcriptions", timeout=10,
                           files={"file": (CLIP, b"x")}, data={"model": "m"})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"


def test_corrupt_file_is_a_400_and_the_server_keeps_serving(server, sample_dir):
    data, _ = _clip(sample_dir)
    for corrupt in (b"not audio at all", data[: len(data) // 2]):
        with pytest.raises(openai.BadRequestError) as caught:
            server.client.audio.transcriptions.create(file=("x.flac", corrupt), model="m")
        assert caught.value.body["param"] == "file"
    no_file = requests.post(f"{server.url}/v1/audio/transcriptions", data={"model": "m"},
                            headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    assert _create(server, sample_dir).text.startswith("the")


def test_oversize_upload_is_a_413(server):
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 40 * SAMPLE_RATE).astype(np.float32)
    data = wav_bytes(noise)  # 1.3 MB over the 1 MB limit
    with pytest.raises(openai.APIStatusError) as caught:
        server.client.audio.transcriptions.create(file=("big.wav", data), model="m")
    assert caught.value.status_code == 413 and caught.value.body["param"] == "file"
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def test_concurrent_requests_are_batched(server, sample_dir):
    data, _ = _clip(sample_dir)
    before = requests.get(f"{server.url}/health", timeout=10).json()["batches"]
    barrier, answers = threading.Barrier(6), [None] * 6

    def ask(index: int) -> None:
        barrier.wait()
        raw = server.client.audio.transcriptions.with_raw_response.create(
            file=(CLIP, data), model="says-the")
        answers[index] = (int(raw.headers["x-batch-size"]), raw.parse().text)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    sizes = [size for size, _ in answers]
    assert all(text.startswith("the") for _, text in answers)
    assert max(sizes) > 1, f"no two clips shared a batch: {sizes}"
    health = requests.get(f"{server.url}/health", timeout=10).json()
    assert health["batches"] - before < 6 and health["max_batch_size_seen"] > 1


# --------------------------------------------------------------------------- word timestamps


def _word_dicts(decoded: Decoded) -> list[dict]:
    return [vars(w) for w in decoded.words]


def test_transformers_words_without_alignment_heads(tiny_english_path, sample_dir):
    """The random test model names no alignment heads: the upper half of the decoder's heads
    is used (openai-whisper's and the CTranslate2 converter's default)."""
    from whisper_exp.transcribe import Transcriber

    transcriber = Transcriber.load(str(tiny_english_path))
    assert not transcriber.model.generation_config.alignment_heads
    audio = load_audio(sample_dir / CLIP)
    decoded = transcriber.transcribe_audio([audio], DecodeOptions(word_timestamps=True))[0]
    assert transcriber.model.generation_config.alignment_heads == [[1, 0], [1, 1]]
    assert decoded.segments, "word timings imply segments"
    _check_words(_word_dicts(decoded), decoded.text, len(audio) / SAMPLE_RATE)


def test_prompt_reaches_both_decoders(says_the_path, tmp_path, sample_dir, monkeypatch):
    from faster_whisper import WhisperModel

    from whisper_exp.ctranslate2_backend import FasterWhisperTranscriber
    from whisper_exp.transcribe import Transcriber

    audio = load_audio(sample_dir / CLIP)
    transcriber = Transcriber.load(str(says_the_path))
    seen = {}
    original = transcriber.model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transcriber.model, "generate", spy)
    transcriber.transcribe_audio([audio], DecodeOptions(prompt="Kenobi"))
    prompt = transcriber.processor.tokenizer.decode(seen["prompt_ids"])
    assert prompt == "<|startofprev|> Kenobi"

    fast = FasterWhisperTranscriber.load(_export_ct2(says_the_path, tmp_path / "ct2"))
    calls = []
    original_fw = WhisperModel.transcribe

    def spy_fw(self, *args, **kwargs):
        calls.append(kwargs.get("initial_prompt"))
        return original_fw(self, *args, **kwargs)

    monkeypatch.setattr(WhisperModel, "transcribe", spy_fw)
    fast.transcribe_audio([audio], DecodeOptions(prompt="Kenobi", return_timestamps=True))
    assert calls == ["Kenobi"]


def test_transcribe_cli_word_timestamps(says_the_path, sample_dir, tmp_path):
    out = tmp_path / "out"
    for fmt in ("srt", "json"):
        result = CliRunner().invoke(main, ["transcribe", str(sample_dir / CLIP), "--model",
                                           str(says_the_path), "--word-timestamps",
                                           "--format", fmt, "--output-dir", str(out)])
        assert result.exit_code == 0, result.output
    data = json.loads((out / "001350134.json").read_text())
    _check_words(data["words"], data["text"], data["duration"])
    cues = (out / "001350134.srt").read_text().strip().split("\n\n")
    assert len(cues) == len(data["words"]) and cues[0].split("\n")[2] == data["words"][0]["word"]


def test_served_pyfunc_word_timestamps(says_the_path, sample_dir):
    import pandas as pd
    from servers import b64

    from whisper_exp.serving import WhisperPyfunc

    model = WhisperPyfunc()
    model.load_context(SimpleNamespace(artifacts={"model": str(says_the_path)}))
    request = pd.DataFrame({"audio": [b64((sample_dir / CLIP).read_bytes())]})
    plain = model.predict(None, request)
    assert list(plain.columns) == ["text"]
    output = model.predict(None, request, params={"word_timestamps": True})
    assert list(output.columns) == ["text", "words"]
    _check_words(output["words"][0], output["text"][0], 2.31)


def test_real_tiny_en_word_timings_agree_across_backends(tiny_en_path, dev_dir, tmp_path):
    """Real-asset layer: stock tiny.en has tuned alignment heads; both engines place the same
    words within a fraction of a second of each other, and a prompt steers the decoder."""
    from whisper_exp.ctranslate2_backend import FasterWhisperTranscriber
    from whisper_exp.transcribe import Transcriber

    audios = [load_audio(f) for f in sorted(dev_dir.glob("*.flac"))[:4]]
    options = DecodeOptions(word_timestamps=True)
    slow = Transcriber.load(str(tiny_en_path)).transcribe_audio(audios, options)
    fast = FasterWhisperTranscriber.load(_export_ct2(tiny_en_path, tmp_path / "ct2"),
                                         compute_type="float32")
    quick = fast.transcribe_audio(audios, options)
    gaps = []
    for audio, a, b in zip(audios, slow, quick, strict=True):
        _check_words(_word_dicts(a), a.text, len(audio) / SAMPLE_RATE)
        _check_words(_word_dicts(b), b.text, len(audio) / SAMPLE_RATE)
        if [w.word for w in a.words] == [w.word for w in b.words]:
            gaps += [abs(x.start - y.start) for x, y in zip(a.words, b.words, strict=True)]
            gaps += [abs(x.end - y.end) for x, y in zip(a.words, b.words, strict=True)]
    assert gaps and statistics.median(gaps) < 0.2, gaps


def test_real_tiny_en_prompt_steers_the_decoder(tiny_en_path, sample_dir):
    """Real-asset layer: stock tiny.en drops the first word of the clip; the prompt's spelling
    and context bring it back."""
    from whisper_exp.transcribe import Transcriber

    transcriber = Transcriber.load(str(tiny_en_path))
    audio = load_audio(sample_dir / CLIP)
    plain, prompted = (transcriber.transcribe_audio([audio], DecodeOptions(prompt=prompt))[0]
                       for prompt in (None, "He is a big boy."))
    assert plain.text == "is a big boy." and prompted.text == "He is a big boy."


def test_exports_keep_the_alignment_heads(tiny_english_path, tmp_path):
    """A fine-tuned model keeps its base's alignment heads (generation config) through a merged
    Hugging Face export and into a CTranslate2 export, so both engines align words alike."""
    import shutil

    from transformers import GenerationConfig

    from whisper_exp.export import export_model

    source = tmp_path / "tuned"
    shutil.copytree(tiny_english_path, source)
    generation = GenerationConfig.from_pretrained(source)
    generation.alignment_heads = [[1, 1]]
    generation.save_pretrained(source)
    merged = export_model(str(source), tmp_path / "hf", fmt="hf", log_to_run=False)
    assert GenerationConfig.from_pretrained(merged).alignment_heads == [[1, 1]]
    ct2 = _export_ct2(merged, tmp_path / "ct2")
    assert json.loads((ct2 / "config.json").read_text())["alignment_heads"] == [[1, 1]]


def test_serving_a_ct2_export_never_imports_torch(says_the_path, tmp_path, sample_dir):
    """A CTranslate2 export logged to a run is resolved (``runs:/``), loaded and answers a
    transcription request, in a fresh interpreter without ever importing torch."""
    import subprocess
    import sys

    import mlflow

    export = _export_ct2(says_the_path, tmp_path / "ct2")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(export), "model")
    script = f"""
import sys
from fastapi.testclient import TestClient
from whisper_exp.openai_server import ServeSettings, create_app
with TestClient(create_app(ServeSettings(model="runs:/{run.info.run_id}"))) as client:
    answer = client.post("/v1/audio/transcriptions", data={{"model": "m"}},
                         files={{"file": ("clip.flac", open(sys.argv[1], "rb").read())}})
    health = client.get("/health").json()
assert answer.status_code == 200, answer.text
assert health["backend"] == "ctranslate2", health
print("text:", answer.json()["text"])
print("torch imported:", "torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script, str(sample_dir / CLIP)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "text: the the" in result.stdout
    assert "torch imported: False" in result.stdout
