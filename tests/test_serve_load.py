"""`mlflow models serve` under concurrent load: real speech from 8 clients at once with bad
requests mixed in, every one answered right and the server still up afterwards.

benchmarks/serve_load.py is the 50-client version with latency figures; test_serving.py checks
each bad request's message one at a time.
"""

import csv
from concurrent.futures import ThreadPoolExecutor

import mlflow
import requests
from servers import b64, model_server

from whisper_exp.metrics import english_normalizer, score
from whisper_exp.registry import register_run

CLIENTS = 8
BAD = [{"dataframe_records": [{"audio": "not base64!"}]},
       {"dataframe_records": [{"audio": ""}]},
       {"dataframe_records": [{"audio": b64(b"<html>not audio</html>")}]},
       {"dataframe_records": [{"file": b64(b"RIFF")}]}]


def test_concurrent_real_speech_and_bad_requests(tiny_en_path, dev_dir, tmp_path):
    with mlflow.start_run(run_name="load-test model") as run:
        mlflow.log_artifacts(str(tiny_en_path), "model")
    register_run(run.info.run_id, name="whisper-exp-load", alias="load-test")
    rows = list(csv.DictReader((dev_dir / "metadata.csv").open(encoding="utf-8")))[:CLIENTS]
    good = [{"dataframe_records": [{"audio": b64((dev_dir / r["file_name"]).read_bytes())}]}
            for r in rows]
    half = CLIENTS // 2
    payloads = [*good[:half], *BAD, *good[half:]]  # the bad ones amid the load

    with model_server("models:/whisper-exp-load@load-test", tmp_path / "server.log",
                      cwd=tmp_path, extra_args=["-t", "600"]) as (url, process):

        def post(payload: dict) -> requests.Response:
            return requests.post(f"{url}/invocations", json=payload, timeout=600)

        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            answers = list(pool.map(post, payloads))
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        assert process.poll() is None, "still serving after the load"

    bad_answers = answers[half:half + len(BAD)]
    good_answers = answers[:half] + answers[half + len(BAD):]
    assert [a.status_code for a in bad_answers] == [400] * len(BAD), [a.text for a in bad_answers]
    assert [a.status_code for a in good_answers] == [200] * CLIENTS
    texts = [a.json()["predictions"][0]["text"] for a in good_answers]
    wer = score([r["transcription"] for r in rows], texts, english_normalizer()).wer
    assert wer < 0.6, "answers are real transcripts of the posted speech, in order"
