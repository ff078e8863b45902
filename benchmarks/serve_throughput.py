"""Serving throughput: requests/s and RTFx of one CTranslate2 int8 model at 1, 4 and 16
concurrent clients, served two ways, against direct sequential faster-whisper.

Run (not in CI; on an idle machine, the default 64 clips x 3 servers x 3 client counts take
about 10 minutes on 2 cores):
    python benchmarks/serve_throughput.py --clips 8 --clients 1,4     # check the script
    python benchmarks/serve_throughput.py                             # 64 dev clips, 1,4,16
    python benchmarks/serve_throughput.py --model runs:/<run_id>

Rows, all on the model (``--model``, stock tiny.en by default) exported once to CTranslate2
int8, greedy, real dev clips (FLAC bytes as the client sends them):
(a) ``whisper-exp serve`` (OpenAI API, ``response_format=json``), micro-batching on: clips that
    arrive within ``--batch-wait-ms`` are decoded in one encoder + decoder pass (faster-whisper's
    BatchedInferencePipeline); ``batch`` is the mean batch size the server reported
    (``X-Batch-Size``);
(b) ``mlflow models serve`` of the same model registered with backend ctranslate2 int8 (base64
    JSON on /invocations; one request, one clip);
(c) direct faster-whisper int8 in this process, one clip after another
    (``decode_with_faster_whisper``): the baseline every ``x direct`` ratio divides by;
plus where the CPU time goes: the encoder's time per clip run one clip at a time vs four clips
in one batch, and the in-process batched decode at batch 4 and 16 (what micro-batching can
reach at best). Servers and this process get ``OMP_NUM_THREADS=--threads``. The issue's
target: (a) at >= 4 clients >= 1.3x (c).
Writes benchmarks/results/serve_throughput.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from machine import (
    SHARED,
    describe_machine,
    free_port,
    model_server,
    pyplot,
    save_results,
    stop_process_group,
)

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def openai_server(model: Path, log: Path, env: dict[str, str], args) -> Iterator[str]:
    """``whisper-exp serve MODEL`` on a free loopback port until /health answers."""
    port = free_port()
    command = [sys.executable, "-m", "whisper_exp.cli", "serve", str(model), "--host",
               "127.0.0.1", "--port", str(port), "--max-batch-size", str(args.max_batch_size),
               "--batch-wait-ms", str(args.batch_wait_ms)]
    with log.open("wb") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"whisper-exp serve did not start:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/health", timeout=5).ok:
                    break
            time.sleep(0.5)
        yield url
    finally:
        stop_process_group(process)


def run_clients(post: Callable[[int], tuple[str, int]], n: int, clients: int) -> dict:
    """Post clips 0..n-1 from ``clients`` threads; wall time, texts and batch sizes."""
    post(0)  # warm-up, untimed
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(pool.map(post, range(n)))
    return {"wall_s": time.perf_counter() - start, "texts": [a[0] for a in answers],
            "batch": float(np.mean([a[1] for a in answers]))}


def encoder_costs(model, audios: list[np.ndarray]) -> dict[str, float]:
    """Seconds per clip of the CTranslate2 encoder alone: four clips one by one vs in one
    batch of four (transformers' 30 s features, as the backend feeds them)."""
    import ctranslate2

    from whisper_exp.ctranslate2_backend import pad_to_window

    features = np.stack([model.feature_extractor(pad_to_window(a))[:, :3000]
                         for a in audios[:4]]).astype(np.float32)

    def encode(batch: np.ndarray) -> None:
        model.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(batch)))

    encode(features[:1])  # warm-up
    start = time.perf_counter()
    for i in range(len(features)):
        encode(features[i:i + 1])
    one = (time.perf_counter() - start) / len(features)
    start = time.perf_counter()
    encode(features)
    return {"encoder_s_per_clip_batch1": one,
            "encoder_s_per_clip_batch4": (time.perf_counter() - start) / len(features)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHARED / "models/whisper-tiny.en"))
    parser.add_argument("--dev", type=Path, default=SHARED / "data/speechocean762/dev")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="serve-throughput-") as scratch:
        benchmark(args, Path(scratch))


def benchmark(args, workdir: Path) -> None:
    import ctranslate2
    import faster_whisper
    import mlflow

    from whisper_exp.audio import SAMPLE_RATE, load_audio
    from whisper_exp.ctranslate2_backend import (
        decode_clips_batched,
        decode_with_faster_whisper,
        load_faster_whisper,
    )
    from whisper_exp.export import export_model
    from whisper_exp.metrics import english_normalizer, score
    from whisper_exp.model_reference import resolve_model_reference
    from whisper_exp.registry import register_run

    if not (args.dev / "metadata.csv").exists():
        raise SystemExit(f"{args.dev}/metadata.csv not found: pass --dev (see ../shared)")
    with (args.dev / "metadata.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[:args.clips]
    files = [(args.dev / row["file_name"]).read_bytes() for row in rows]
    audios = [load_audio(data) for data in files]
    seconds = sum(len(a) for a in audios) / SAMPLE_RATE
    references = [row["transcription"] for row in rows]
    clients = [int(c) for c in args.clients.split(",")]
    n = len(files)

    export = export_model(args.model, workdir / "ct2-int8", fmt="ctranslate2",
                          quantization="int8", log_to_run=False)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serve-throughput")
    with mlflow.start_run(run_name="throughput model") as run:
        mlflow.log_artifacts(resolve_model_reference(args.model), "model")
    register_run(run.info.run_id, name="throughput", alias="ct2", backend="ctranslate2",
                 quantization="int8")

    results: list[dict] = []

    def add(row: str, n_clients: int | str, result: dict) -> None:
        texts = result.pop("texts")
        result.update(row=row, clients=n_clients, requests_per_s=n / result["wall_s"],
                      rtfx=seconds / result["wall_s"],
                      wer=score(references, texts, english_normalizer()).wer)
        results.append(result)
        print(f"{row} clients={n_clients}: {result['requests_per_s']:.2f} req/s, RTFx "
              f"{result['rtfx']:.1f}, batch {result.get('batch', 1):.1f}", flush=True)

    # (c) the baseline, and where the time goes.
    model = load_faster_whisper(export, compute_type="default")
    decode_with_faster_whisper(model, audios[0])
    start = time.perf_counter()
    texts = [decode_with_faster_whisper(model, audio).text for audio in audios]
    add("(c) direct faster-whisper, sequential", 1,
        {"wall_s": time.perf_counter() - start, "texts": texts, "batch": 1.0})
    for batch in (4, 16):
        start = time.perf_counter()
        texts = decode_clips_batched(model, audios, batch_size=batch)
        add(f"direct faster-whisper, batched {batch} (in-process bound)", 1,
            {"wall_s": time.perf_counter() - start, "texts": texts, "batch": float(batch)})
    costs = encoder_costs(model, audios)
    del model

    # (a) the OpenAI server with micro-batching.
    with openai_server(export, workdir / "openai.log", env, args) as url:
        def post_openai(i: int) -> tuple[str, int]:
            answer = requests.post(f"{url}/v1/audio/transcriptions", data={"model": "m"},
                                   files={"file": (rows[i]["file_name"], files[i])},
                                   timeout=600)
            answer.raise_for_status()
            return answer.json()["text"], int(answer.headers["X-Batch-Size"])

        for c in clients:
            add("(a) whisper-exp serve, micro-batching", c, run_clients(post_openai, n, c))

    # (b) MLflow's scoring server of the registered ctranslate2 version.
    payloads = [{"dataframe_split": {"columns": ["audio"],
                                     "data": [[base64.b64encode(data).decode()]]}}
                for data in files]
    with model_server("models:/throughput@ct2", workdir / "mlflow.log", env, cwd=workdir,
                      extra_args=["-t", "600"]) as (url, _process):
        def post_mlflow(i: int) -> tuple[str, int]:
            answer = requests.post(f"{url}/invocations", json=payloads[i], timeout=600)
            answer.raise_for_status()
            return answer.json()["predictions"][0]["text"], 1

        for c in clients:
            add("(b) mlflow models serve", c, run_clients(post_mlflow, n, c))

    baseline = results[0]["requests_per_s"]
    for result in results:
        result["x_direct"] = result["requests_per_s"] / baseline
    header = [
        f"{describe_machine()}; ctranslate2 {ctranslate2.__version__}, faster-whisper "
        f"{faster_whisper.__version__}; OMP_NUM_THREADS={args.threads}",
        f"model {args.model} as CTranslate2 int8; {n} dev clips ({seconds / 60:.1f} min); "
        f"serve --max-batch-size {args.max_batch_size} --batch-wait-ms {args.batch_wait_ms:g}",
        f"encoder alone: {1000 * costs['encoder_s_per_clip_batch1']:.0f} ms per clip one at a "
        f"time, {1000 * costs['encoder_s_per_clip_batch4']:.0f} ms per clip in a batch of 4",
        "",
        "| row | clients | req/s | RTFx | x direct | mean batch | WER |",
        "|---|---|---|---|---|---|---|",
    ]
    lines = [f"| {r['row']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['rtfx']:.1f} | "
             f"{r['x_direct']:.2f} | {r['batch']:.1f} | {100 * r['wer']:.1f}% |"
             for r in results]
    table = "\n".join(header + lines)
    print(table)
    save_results(args.out, "serve_throughput", table, [{**r, **costs} for r in results])
    plot(results, clients, args.out / "serve_throughput.png")


def plot(results: list[dict], clients: list[int], path: Path) -> None:
    """requests/s against clients, one line per server, the direct baseline dashed."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ("(a) whisper-exp serve, micro-batching", "(b) mlflow models serve"):
        points = [(r["clients"], r["requests_per_s"]) for r in results if r["row"] == name]
        ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.axhline(results[0]["requests_per_s"], color="#666", linestyle="--",
               label="(c) direct faster-whisper, sequential")
    ax.axhline(1.3 * results[0]["requests_per_s"], color="#c44", linestyle=":",
               label="target: 1.3x (c)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests / s (higher is better)")
    ax.set_title("Serving CTranslate2 int8 Whisper on this machine")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
