"""Soak test of `whisper-exp serve` (the OpenAI-compatible API): mixed good and bad requests
from many clients for minutes, watching latency, errors and the server's memory.

Run (not in CI; ~10 min on an idle machine):
    python benchmarks/serve_soak.py                       # 10 min, 16 clients, ../shared tiny.en
    python benchmarks/serve_soak.py --minutes 0.5         # a quick check that it works
    python benchmarks/serve_soak.py --model models:/whisper-exp@champion --clients 16

Every client loops: a real dev utterance (most requests) or a bad one (corrupt audio, empty
file, wrong form field, unknown response_format, oversized upload), chosen at random with a
fixed seed. The server's RSS (all its processes) is sampled every few seconds. Reported: p50 /
p95 latency of good requests, answers by status code per request kind, RSS at start / end /
peak and its growth over the second half (a steady climb there is a leak; the first half holds
warm-up allocations), as a markdown table, a CSV of the RSS samples and a plot. Passing: good
requests all 200, bad ones all 4xx, no 5xx, server alive, second-half RSS growth under
--max-growth-mb.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import requests
import soundfile as sf
from machine import ROOT, SHARED, describe_machine, free_port, pyplot, stop_process_group

TRANSCRIPTIONS = "/v1/audio/transcriptions"


def bad_requests(max_upload_mb: float) -> dict[str, dict]:
    """Request kwargs (files/data) a client can get wrong; each must get a 4xx, never a 5xx."""
    oversized = b"\0" * int((max_upload_mb + 1) * 2**20)
    return {
        "corrupt audio": {"files": {"file": ("a.wav", b"RIFF....not a wave", "audio/wav")},
                          "data": {"model": "whisper"}},
        "empty file": {"files": {"file": ("a.wav", b"", "audio/wav")},
                       "data": {"model": "whisper"}},
        "no file field": {"files": {"audio": ("a.wav", b"RIFF", "audio/wav")},
                          "data": {"model": "whisper"}},
        "bad response_format": {"files": {"file": ("a.wav", _silence(), "audio/wav")},
                                "data": {"model": "whisper", "response_format": "pdf"}},
        "oversized upload": {"files": {"file": ("a.wav", oversized, "audio/wav")},
                             "data": {"model": "whisper"}},
    }


def _silence(seconds: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(16_000 * seconds), dtype=np.float32), 16_000, format="WAV")
    return buffer.getvalue()


def dev_clips(dev: Path, n: int) -> list[tuple[str, bytes]]:
    rows = list(csv.DictReader((dev / "metadata.csv").open(encoding="utf-8")))[:n]
    if not rows:
        raise SystemExit(f"{dev / 'metadata.csv'} has no rows")
    return [(r["file_name"], (dev / r["file_name"]).read_bytes()) for r in rows]


@dataclass
class Answer:
    kind: str  # "good" or the bad request's name
    status: int  # 0: no answer (connection error / timeout)
    seconds: float
    at: float  # seconds since the soak started


def _client(url: str, clips: list[tuple[str, bytes]], bad: dict[str, dict], bad_share: float,
            seed: int, stop_at: float, started: float, out: list[Answer],
            lock: threading.Lock) -> None:
    rng = random.Random(seed)
    session = requests.Session()
    while time.monotonic() < stop_at:
        if rng.random() < bad_share:
            kind = rng.choice(sorted(bad))
            kwargs = bad[kind]
        else:
            kind = "good"
            name, data = rng.choice(clips)
            kwargs = {"files": {"file": (name, data, "audio/flac")},
                      "data": {"model": "whisper"}}
        begun = time.monotonic()
        try:
            status = session.post(url + TRANSCRIPTIONS, timeout=300, **kwargs).status_code
        except requests.RequestException:
            status = 0
        with lock:
            out.append(Answer(kind, status, time.monotonic() - begun, begun - started))


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its children (uvicorn workers), MiB."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total / 2**20


def _sample_rss(pid: int, every_s: float, stop: threading.Event, started: float,
                samples: list[tuple[float, float]]) -> None:
    while not stop.is_set():
        samples.append((time.monotonic() - started, tree_rss_mb(pid)))
        stop.wait(every_s)


def start_server(model: str, workdir: Path, max_upload_mb: float) -> tuple[str, subprocess.Popen]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / "server.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "whisper_exp.cli", "serve", model, "--port", str(port),
             "--max-upload-mb", str(max_upload_mb)], cwd=workdir, stdout=handle,
            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ,
                                                                   "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return url, process
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_process_group(process)
    raise SystemExit(f"server not healthy after 300 s:\n{log.read_text()[-3000:]}")


def growth_mb(samples: list[tuple[float, float]]) -> float:
    """RSS change over the second half of the soak (least-squares slope x duration), MiB."""
    half = [(t, r) for t, r in samples[len(samples) // 2:] if r == r]
    if len(half) < 2:
        return float("nan")
    times, rss = np.array(half).T
    slope = np.polyfit(times, rss, 1)[0]
    return float(slope * (times[-1] - times[0]))


def report(answers: list[Answer], samples: list[tuple[float, float]], minutes: float,
           clients: int, alive: bool, max_growth_mb: float) -> tuple[str, bool]:
    good = [a for a in answers if a.kind == "good"]
    latencies = sorted(a.seconds for a in good if a.status == 200)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(round(q * (len(latencies) - 1))))] \
            if latencies else float("nan")

    by_kind: dict[str, Counter] = {}
    for a in answers:
        by_kind.setdefault(a.kind, Counter())[a.status] += 1
    rss = [r for _, r in samples if r == r]
    growth = growth_mb(samples)
    lines = [f"machine: {describe_machine()}",
             f"{minutes:g} min, {clients} clients, {len(answers)} requests "
             f"({len(answers) / (minutes * 60):.2f}/s); server alive afterwards: {alive}", "",
             "| requests | answered | p50 s | p95 s | RSS start MiB | RSS end MiB | "
             "RSS peak MiB | 2nd-half growth MiB |", "|---|---|---|---|---|---|---|---|",
             f"| {len(good)} good | {sum(a.status == 200 for a in good)} x 200 | "
             f"{statistics.median(latencies) if latencies else float('nan'):.2f} | "
             f"{pct(0.95):.2f} | {rss[0] if rss else float('nan'):.0f} | "
             f"{rss[-1] if rss else float('nan'):.0f} | {max(rss) if rss else float('nan'):.0f} "
             f"| {growth:+.1f} |", "", "| request kind | answers by status |", "|---|---|"]
    for kind, counts in sorted(by_kind.items()):
        shown = ", ".join(f"{status or 'no answer'}: {n}" for status, n in sorted(counts.items()))
        lines.append(f"| {kind} | {shown} |")
    passed = (alive and all(a.status == 200 for a in good)
              and all(400 <= a.status < 500 for a in answers if a.kind != "good")
              and not (growth > max_growth_mb))
    lines += ["", f"verdict: {'PASS' if passed else 'FAIL'} (good all 200, bad all 4xx, no 5xx, "
              f"alive, 2nd-half RSS growth {growth:+.1f} MiB <= {max_growth_mb:g})"]
    return "\n".join(lines), passed


def plot(path: Path, samples: list[tuple[float, float]], answers: list[Answer]) -> None:
    plt = pyplot()
    if plt is None or not samples:
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    times, rss = zip(*samples, strict=True)
    top.plot(times, rss)
    top.set_ylabel("server RSS (MiB)")
    good = [a for a in answers if a.kind == "good" and a.status == 200]
    bottom.scatter([a.at for a in good], [a.seconds for a in good], s=4)
    bottom.set_ylabel("good request latency (s)")
    bottom.set_xlabel("seconds into the soak")
    fig.suptitle("whisper-exp serve soak")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models/whisper-tiny.en"),
                        help="what `whisper-exp serve` serves (folder, runs:/, models:/...)")
    parser.add_argument("--dev", default=str(SHARED / "data/speechocean762/dev"))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--clips", type=int, default=50, help="distinct dev utterances used")
    parser.add_argument("--bad-share", type=float, default=0.2)
    parser.add_argument("--max-upload-mb", type=float, default=2.0)
    parser.add_argument("--rss-every-s", type=float, default=2.0)
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()

    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="whisper-exp-soak-"))
    clips = dev_clips(Path(args.dev), args.clips)
    bad = bad_requests(args.max_upload_mb)
    url, process = start_server(args.model, workdir, args.max_upload_mb)
    answers: list[Answer] = []
    samples: list[tuple[float, float]] = []
    lock, stop = threading.Lock(), threading.Event()
    try:
        started = time.monotonic()
        sampler = threading.Thread(target=_sample_rss, daemon=True,
                                   args=(process.pid, args.rss_every_s, stop, started, samples))
        sampler.start()
        stop_at = started + args.minutes * 60
        threads = [threading.Thread(target=_client, args=(url, clips, bad, args.bad_share,
                                                          args.seed + i, stop_at, started,
                                                          answers, lock))
                   for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        sampler.join()
        try:
            alive = requests.get(f"{url}/health", timeout=10).status_code == 200
        except requests.RequestException:
            alive = False
    finally:
        stop_process_group(process)
    table, passed = report(answers, samples, args.minutes, args.clients, alive,
                           args.max_growth_mb)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_soak.md").write_text(table + "\n", encoding="utf-8")
    with (args.out / "serve_soak_rss.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seconds", "rss_mb"])
        writer.writerows(samples)
    plot(args.out / "serve_soak.png", samples, answers)
    print(f"written: {args.out / 'serve_soak.md'}, serve_soak_rss.csv, serve_soak.png")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
