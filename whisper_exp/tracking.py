"""MLflow plumbing shared by every entry point: run lifecycle, params, memory, tables.

``mlflow run`` creates the run and passes ``MLFLOW_RUN_ID``; a direct CLI/library call creates
its own. Either way a crash ends the run FAILED and Ctrl-C ends it KILLED, with everything logged
before that kept.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def configure(tracking_uri: str | None, experiment_name: str | None) -> None:
    """Point MLflow at a server/DB (else its default: ``sqlite:///mlflow.db`` here)."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    # Under `mlflow run` the experiment is already chosen by the launcher.
    if experiment_name and not os.environ.get("MLFLOW_RUN_ID") \
            and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        mlflow.set_experiment(experiment_name)


@contextlib.contextmanager
def run(run_name: str | None = None, nested: bool = False,
        tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume, under ``mlflow run``) a run that ends KILLED on Ctrl-C, FAILED on error."""
    active = mlflow.start_run(run_name=run_name, nested=nested, tags=dict(tags or {}))
    try:
        yield active
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def log_params(params: Mapping[str, Any]) -> None:
    """Params as strings (None -> ""), in chunks under MLflow's per-call limit."""
    items = [(k, "" if v is None else str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start:start + 100]))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(MiB, what it measures): CUDA max allocated on GPU, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024  # bytes on macOS, KiB on Linux
    return rss_kb * scale, "process_peak_rss"


def log_csv(rows: Sequence[Mapping[str, Any]], artifact_file: str,
            fieldnames: Sequence[str] | None = None) -> None:
    """A CSV artifact (per-utterance tables, splits, skipped rows)."""
    buffer = io.StringIO()
    names = list(fieldnames or (rows[0].keys() if rows else []))
    writer = csv.DictWriter(buffer, fieldnames=names, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    mlflow.log_text(buffer.getvalue(), artifact_file)


def log_directory(path: str | Path, artifact_path: str) -> None:
    mlflow.log_artifacts(str(path), artifact_path)


def scratch_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
