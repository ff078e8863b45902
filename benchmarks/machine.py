"""What the benchmarks share: the machine line every table starts with (benchmarks are only
comparable on one machine), the training benchmarks' model / data / config arguments, how
results are written (markdown table, CSV, plot), and a served model on loopback."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config --model --train --dev --set --out``, defaulting to the shared tiny.en and
    speechocean762 train/dev and ``experiments/lora.yaml``."""
    parser.add_argument("--config", default=str(ROOT / "experiments/lora.yaml"))
    parser.add_argument("--model", default=str(SHARED / "models/whisper-tiny.en"))
    parser.add_argument("--train", default=str(SHARED / "data/speechocean762/train"))
    parser.add_argument("--dev", default=str(SHARED / "data/speechocean762/dev"))
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="extra config overrides for every run, key=value")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")


def describe_machine() -> str:
    """Accelerator (or CPU only), CPU model, cores, RAM and torch version."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total_kb = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        memory = f"; {total_kb / 2**20:.0f} GiB RAM"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{device}; {cpu}; {os.cpu_count()} cores{memory}; torch {torch.__version__}"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_results(out: Path, stem: str, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """``<stem>.md`` (the printed table) and ``<stem>.csv`` (one line per row) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(table + "\n", encoding="utf-8")
    write_csv(out / f"{stem}.csv", rows)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (said once) without it."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: Path, labels: Sequence[str], values: Sequence[float],
              colors: Sequence[str], xlabel: str, title: str,
              size: tuple[float, float] = (8, 4.5)) -> None:
    """Horizontal bars, first row on top."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=size)
    ax.barh(labels, values, color=colors)
    ax.set_xlabel(xlabel)
    ax.invert_yaxis()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM a server's whole process group (the CLI and its workers), SIGKILL after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextlib.contextmanager
def model_server(model_uri: str, log: Path, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, extra_args: Sequence[str] = (),
                 ready_timeout_s: float = 180) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mlflow models serve -m <uri> --env-manager local`` on a free loopback port: yields
    (url, process) once MLflow's own scoring client gets through, and stops the server's whole
    process group (the CLI and its workers, all in the measured process tree) on exit."""
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    port = free_port()
    env = dict(env or os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
               "--env-manager", "local", *extra_args, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as handle:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            ScoringServerClient("127.0.0.1", port).wait_server_ready(ready_timeout_s, process)
        except RuntimeError as exc:
            raise SystemExit(f"{exc}\n{log.read_text()[-3000:]}") from exc
        yield f"http://127.0.0.1:{port}", process
    finally:
        stop_process_group(process)
