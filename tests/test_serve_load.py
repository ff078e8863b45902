"""A bounded load test of `mlflow models serve` (benchmarks/serve_load.py at CI size)."""

import sys
from pathlib import Path

import requests
from servers import model_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from serve_load import (  # noqa: E402
    bad_payloads,
    dev_requests,
    post_all,
    register_local_model,
    summarize,
)


def test_concurrent_real_speech_and_bad_payloads(tiny_en_path, dev_dir, tmp_path):
    uri = register_local_model(tiny_en_path, "whisper-exp-load")
    good = dev_requests(dev_dir, 8)
    bad = bad_payloads()
    with model_server(uri, tmp_path / "server.log", cwd=tmp_path,
                      extra_args=["-t", "600"]) as (url, process):
        result = post_all(url, good, bad, concurrency=8)
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        assert process.poll() is None, "still serving after the load"
    summary = summarize(result)
    assert summary["good_200"] == summary["good_requests"] == 8
    assert summary["bad_4xx"] == summary["bad_requests"] == len(bad)
    assert summary["any_5xx"] == 0
    assert summary["wer"] < 0.6, "answers are real transcripts of the posted speech"
    assert summary["p95_s"] >= summary["p50_s"] > 0
