"""Load test of the served model: concurrent real speech plus malformed requests.

Run (not in CI; tests/test_serve_load.py is a CI-sized check of the same behaviour):
    python benchmarks/serve_load.py                      # registers tiny.en, 50 concurrent
    python benchmarks/serve_load.py --model-uri models:/whisper-exp@champion --concurrency 50

Starts `mlflow models serve` on loopback, posts N real dev utterances from N concurrent clients
with malformed, empty, oversized and non-audio payloads mixed in, and reports status codes,
p50/p95 latency, and WER of the answered transcripts. Passing means: every good request 200,
every bad one 4xx, no 5xx, and the server still answers afterwards.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import soundfile as sf
from machine import SHARED, model_server


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def bad_payloads() -> dict[str, dict]:
    """Each malformed request a client can send; all must get a 4xx, none a 5xx."""
    oversized = io.BytesIO()
    sf.write(oversized, np.zeros(31 * 60 * 1000, dtype=np.int16), 1000, format="FLAC")
    return {
        "not base64": {"dataframe_records": [{"audio": "%%% not base64 %%%"}]},
        "empty": {"dataframe_records": [{"audio": ""}]},
        "non-audio": {"dataframe_records": [{"audio": _b64(b"<html>not audio</html>")}]},
        "oversized (31 min)": {"dataframe_records": [{"audio": _b64(oversized.getvalue())}]},
        "wrong column": {"dataframe_records": [{"file": _b64(b"RIFF")}]},
        "not json": "this is not json",
    }


@dataclass
class Answer:
    name: str
    status: int
    seconds: float
    text: str | None = None
    reference: str | None = None


@dataclass
class LoadResult:
    answers: list[Answer] = field(default_factory=list)
    wall_seconds: float = 0.0

    def good(self) -> list[Answer]:
        return [a for a in self.answers if a.reference is not None]

    def bad(self) -> list[Answer]:
        return [a for a in self.answers if a.reference is None]

    def latency(self, q: float) -> float:
        values = sorted(a.seconds for a in self.good())
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def post_all(url: str, good: list[tuple[str, bytes, str]], bad: dict[str, object],
             concurrency: int, timeout_s: float = 600) -> LoadResult:
    """Post good (name, audio bytes, reference) and bad payloads from ``concurrency`` threads."""
    jobs = [(name, {"dataframe_records": [{"audio": _b64(data)}]}, ref)
            for name, data, ref in good]
    jobs += [(name, payload, None) for name, payload in bad.items()]
    # Interleave the bad requests among the good ones.
    jobs.sort(key=lambda job: hash(job[0]) % 997)

    def post(job) -> Answer:
        name, payload, reference = job
        started = time.perf_counter()
        if isinstance(payload, str):
            response = requests.post(f"{url}/invocations", data=payload, timeout=timeout_s,
                                     headers={"Content-Type": "application/json"})
        else:
            response = requests.post(f"{url}/invocations", json=payload, timeout=timeout_s)
        seconds = time.perf_counter() - started
        text = None
        if response.status_code == 200:
            text = response.json()["predictions"][0]["text"]
        return Answer(name, response.status_code, seconds, text, reference)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(post, jobs))
    return LoadResult(answers, time.perf_counter() - started)


def dev_requests(dev: Path, n: int) -> list[tuple[str, bytes, str]]:
    rows = list(csv.DictReader((dev / "metadata.csv").open(encoding="utf-8")))[:n]
    return [(r["file_name"], (dev / r["file_name"]).read_bytes(), r["transcription"])
            for r in rows]


def register_local_model(model_dir: Path, name: str) -> str:
    """Log a local HF folder as a run's model and register it (alias load-test)."""
    import mlflow

    from whisper_exp.registry import register_run

    with mlflow.start_run(run_name="load-test model") as run:
        mlflow.log_artifacts(str(model_dir), "model")
    register_run(run.info.run_id, name=name, alias="load-test")
    return f"models:/{name}@load-test"


def summarize(result: LoadResult) -> dict[str, float]:
    from whisper_exp.metrics import english_normalizer, score

    good = result.good()
    scores = score([a.reference for a in good if a.text is not None],
                   [a.text for a in good if a.text is not None], english_normalizer())
    return {
        "good_requests": len(good),
        "good_200": sum(a.status == 200 for a in good),
        "bad_requests": len(result.bad()),
        "bad_4xx": sum(400 <= a.status < 500 for a in result.bad()),
        "any_5xx": sum(a.status >= 500 for a in result.answers),
        "p50_s": statistics.median(a.seconds for a in good),
        "p95_s": result.latency(0.95),
        "wall_s": result.wall_seconds,
        "wer": scores.wer,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", default="", help="served model (default: register "
                        "../shared whisper-tiny.en in a temporary tracking store)")
    parser.add_argument("--model-dir", default=str(SHARED / "models/whisper-tiny.en"))
    parser.add_argument("--dev", default=str(SHARED / "data/speechocean762/dev"))
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="whisper-exp-load-"))
    os.chdir(workdir)
    if not args.model_uri:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
        args.model_uri = register_local_model(Path(args.model_dir), "whisper-exp-load")
    good = dev_requests(Path(args.dev), args.requests)
    with model_server(args.model_uri, workdir / "server.log", cwd=workdir,
                      extra_args=["-t", "600"]) as (url, process):
        result = post_all(url, good, bad_payloads(), args.concurrency)
        alive = requests.get(f"{url}/health", timeout=10).status_code == 200
    summary = summarize(result)
    print(f"{args.concurrency} concurrent clients, {args.model_uri}, CPU "
          f"{os.cpu_count()} cores; server alive afterwards: {alive}")
    print("| " + " | ".join(summary) + " |")
    print("|" + "---|" * len(summary))
    print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v)
                            for v in summary.values()) + " |")
    for answer in result.bad():
        print(f"  bad request {answer.name!r}: HTTP {answer.status}")


if __name__ == "__main__":
    main()
