"""Serving the registered model: request validation (each bad request is a clear 400) and a real
``mlflow models serve`` process on loopback, run with only the model's declared requirements
importable."""

from __future__ import annotations

import csv
import io
import math
import os
import re
import signal
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import soundfile as sf
from mlflow.exceptions import MlflowException
from servers import b64, clean_environment, model_server, wav_bytes

from whisper_exp.audio import load_audio
from whisper_exp.registry import register_run, serving_requirements
from whisper_exp.serving import decode_request

ROOT = Path(__file__).resolve().parent.parent


def _over_30_minutes_flac() -> bytes:
    """31 minutes of silence at 1 kHz: a small, valid file whose header says it is too long."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(31 * 60 * 1000, dtype=np.int16), 1000, format="FLAC")
    return buffer.getvalue()


# Each bad request, and a piece of the message it must get back.
BAD_REQUESTS = {
    "not base64": ({"dataframe_records": [{"audio": "this is *not* base64!"}]},
                   "row 0: 'audio' is not valid base64"),
    "not audio": ({"dataframe_records": [{"audio": b64(b"just some text, no audio")}]},
                  "row 0: not a readable audio file"),
    "empty": ({"dataframe_records": [{"audio": ""}]}, "row 0: 'audio' is empty"),
    "over 30 minutes": ({"dataframe_records": [{"audio": b64(_over_30_minutes_flac())}]},
                        "over 30 minutes of audio"),
    "wrong column": ({"dataframe_records": [{"file": b64(b"RIFF")}]},
                     "Model is missing inputs ['audio']"),
}


@pytest.mark.parametrize("name", [n for n in BAD_REQUESTS if n != "wrong column"])
def test_bad_rows_are_invalid_parameter_errors(name):
    payload, message = BAD_REQUESTS[name]
    with pytest.raises(MlflowException, match=re.escape(message)) as caught:
        decode_request(pd.DataFrame(payload["dataframe_records"]))
    assert caught.value.get_http_status_code() == 400


def test_request_shape_errors():
    for frame, message in [(pd.DataFrame({"file": ["x"]}), "has no 'audio' column"),
                           (pd.DataFrame({"audio": []}), "holds no rows"),
                           (pd.DataFrame({"audio": [math.nan]}), "'audio' is empty"),
                           (pd.DataFrame({"audio": [12]}), "must be a base64 string")]:
        with pytest.raises(MlflowException, match=message):
            decode_request(frame)


def test_line_wrapped_base64_and_data_uri_are_accepted(sample_dir):
    data = (sample_dir / "001350134.flac").read_bytes()
    encoded = b64(data)
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    audios = decode_request(pd.DataFrame({"audio": [wrapped, "data:audio/flac;base64," + encoded]}))
    expected = load_audio(sample_dir / "001350134.flac")
    assert all(np.array_equal(audio, expected) for audio in audios)


# Registration options per backend; the ctranslate2 one also serves without torch.
BACKENDS = {"transformers": {}, "ctranslate2": {"quantization": "int8"}}
# How `mlflow models serve` may end on SIGTERM: handled (0) or by the signal's default action.
STOPPED_BY_SIGTERM = (0, -signal.SIGTERM)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlflow_models_serve_transcribes_and_rejects_bad_requests(says_the_path, sample_dir,
                                                                   tmp_path, backend):
    """The server answers what the registered model answers in-process (says_the: a model whose
    transcript is never empty), survives every bad request, and stops on SIGTERM."""
    mlflow.create_experiment("serving-test", artifact_location=(tmp_path / "mlruns").as_uri())
    mlflow.set_experiment("serving-test")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(says_the_path), "model")
    register_run(run.info.run_id, alias="champion", backend=backend, **BACKENDS[backend])
    rows = list(csv.DictReader((sample_dir / "metadata.csv").open(encoding="utf-8")))[:2]

    clean_env, blocked = clean_environment(tmp_path / "clean-env",
                                           serving_requirements(backend=backend))
    assert "peft" in blocked, "a merged model must serve without peft"
    if backend == "ctranslate2":
        assert "torch" in blocked, "faster-whisper serving must not need torch"
    env = dict(os.environ, PYTHONPATH=str(clean_env))
    with model_server("models:/whisper-exp@champion", tmp_path / "server.log", env,
                      cwd=tmp_path) as (url, process):

        def post(payload):
            return requests.post(f"{url}/invocations", json=payload, timeout=120)

        flac = (sample_dir / rows[0]["file_name"]).read_bytes()
        wav = wav_bytes(load_audio(sample_dir / rows[1]["file_name"]))
        in_process = mlflow.pyfunc.load_model("models:/whisper-exp@champion")
        for data in (flac, wav):
            answer = post({"dataframe_records": [{"audio": b64(data)}]})
            assert answer.status_code == 200, answer.text
            text = answer.json()["predictions"][0]["text"]
            assert set(text.split()) == {"the"}, text
            assert text == in_process.predict(pd.DataFrame({"audio": [b64(data)]}))["text"][0]

        bad_params = ({"dataframe_records": [{"audio": b64(flac)}], "params": {"num_beams": 0}},
                      "num_beams must be between 1 and 16, got 0")
        for name, (payload, message) in {**BAD_REQUESTS, "bad params": bad_params}.items():
            answer = post(payload)
            assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
            assert message in answer.json()["message"], (name, answer.text)

        again = post({"dataframe_split": {"columns": ["audio"], "data": [[b64(flac)]]},
                      "params": {"return_timestamps": True}})
        assert again.status_code == 200, "still serving after the bad requests"
        prediction = again.json()["predictions"][0]
        assert prediction["segments"] and prediction["segments"][0]["end"] > 0
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        assert process.poll() is None
    assert process.returncode in STOPPED_BY_SIGTERM, "stopped cleanly, no SIGKILL needed"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=5)


# A dev clip stock tiny.en loops on ("Mark, leg, leg, jaw, jaw, jaw, ..."): uncapped, the served
# model decoded it to 444 tokens while `evaluate` stopped at its own cap, and scored it worse.
LOOPING_CLIP = "001040149.flac"


def test_served_model_stops_at_the_length_cap_like_evaluate(says_the_path, sample_dir):
    """A model that never ends its transcript (says_the) is cut at the length-scaled token cap,
    per request in the pyfunc as in evaluation's batched decoding."""
    from types import SimpleNamespace

    from whisper_exp.decoding import default_max_new_tokens
    from whisper_exp.evaluation import transcribe_arrays
    from whisper_exp.serving import WhisperPyfunc

    names = ["001350134.flac", "001350163.flac"]
    served = WhisperPyfunc()
    served.load_context(SimpleNamespace(artifacts={"model": str(says_the_path)}))
    texts = [served.predict(None, pd.DataFrame({"audio": [b64((sample_dir / n).read_bytes())]})
                            )["text"][0] for n in names]
    audios = [load_audio(sample_dir / n) for n in names]
    assert [len(t.split()) for t in texts] == [default_max_new_tokens(len(a) / 16_000)
                                               for a in audios], "one ' the' per token, to the cap"
    transcriber = served.transcriber
    assert texts == transcribe_arrays(transcriber.model, transcriber.processor, audios,
                                      batch_size=1, progress=False)


def test_served_model_decodes_like_evaluate(tiny_en_path, dev_dir):
    """The pyfunc (one request per clip) and evaluation's batched decoding share one decoding
    policy, including the length-scaled token cap that stops a looping clip early."""
    from types import SimpleNamespace

    from whisper_exp.decoding import default_max_new_tokens
    from whisper_exp.evaluation import transcribe_arrays
    from whisper_exp.serving import WhisperPyfunc

    rows = list(csv.DictReader((dev_dir / "metadata.csv").open(encoding="utf-8")))
    names = [LOOPING_CLIP] + [r["file_name"] for r in rows[:3] if r["file_name"] != LOOPING_CLIP]
    served = WhisperPyfunc()
    served.load_context(SimpleNamespace(artifacts={"model": str(tiny_en_path)}))
    texts = [served.predict(None, pd.DataFrame({"audio": [b64((dev_dir / n).read_bytes())]})
                            )["text"][0] for n in names]
    transcriber = served.transcriber
    audios = [load_audio(dev_dir / n) for n in names]
    assert texts == transcribe_arrays(transcriber.model, transcriber.processor, audios,
                                      batch_size=4, progress=False)
    looping_tokens = len(transcriber.processor.tokenizer(texts[0], add_special_tokens=False)
                         .input_ids)
    cap = default_max_new_tokens(len(audios[0]) / 16_000)
    assert cap < 120 and looping_tokens <= cap, (looping_tokens, texts[0][:80])


def test_served_multilingual_model_detects_the_language_unless_a_request_sets_it(
        tiny_multilingual_path, monkeypatch):
    """A registered multilingual model that records no language answers a request without one
    in the detected language (not forced English); a request's ``language`` still wins."""
    from types import SimpleNamespace

    from whisper_exp.serving import WhisperPyfunc

    served = WhisperPyfunc()
    served.load_context(SimpleNamespace(artifacts={"model": str(tiny_multilingual_path)}))
    model = served.transcriber.model
    prompts, detections = [], []
    original_prompt, original_detect = model._retrieve_init_tokens, model.detect_language

    def spy_prompt(*args, **kwargs):
        tokens = original_prompt(*args, **kwargs)
        prompts.append(tokens.tolist())
        return tokens

    def spy_detect(*args, **kwargs):
        detections.append(1)
        return original_detect(*args, **kwargs)

    monkeypatch.setattr(model, "_retrieve_init_tokens", spy_prompt)
    monkeypatch.setattr(model, "detect_language", spy_detect)
    clip = (0.1 * np.sin(np.arange(16_000) / 5)).astype(np.float32)
    request = pd.DataFrame({"audio": [b64(wav_bytes(clip))]})
    served.predict(None, request, params={"max_new_tokens": 3})
    assert detections == [1]
    served.predict(None, request, params={"max_new_tokens": 3, "language": "de"})
    german = model.generation_config.lang_to_id["<|de|>"]
    assert detections == [1] and prompts[1][0][1] == german
