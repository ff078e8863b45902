"""The tracking server goes away during `whisper-exp train` (real processes: an `mlflow server`
stopped with SIGTERM to its process group, a training subprocess).

Back after the outage: training never stopped, the run ends FINISHED and the server holds every
logged metric value, also those of the outage. Never back: the run stays on disk and
`whisper-exp upload-run` sends it to a fresh server.

The outage length is WHISPER_EXP_TEST_OUTAGE_S (default 15 s of server down time, plus the
server's restart); run it with 60 for the issue's figure.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from servers import free_port, stop, wait_for_health

from whisper_exp.cli import main
from whisper_exp.run_journal import (
    JOURNAL_DIR,
    METRICS_FILE,
    WAIT_ENV,
    RunJournal,
    TrackingUnavailable,
    read_metrics,
)

OUTAGE_S = float(os.environ.get("WHISPER_EXP_TEST_OUTAGE_S", "15"))
EXPERIMENT = "outage"


@contextlib.contextmanager
def tracking_server(folder: Path, port: int, name: str = "server") -> Iterator[str]:
    """`mlflow server` on SQLite in ``folder``, on ``port`` (the same port again after a
    restart), stopped (whole process group) on exit."""
    url = f"http://127.0.0.1:{port}"
    log = folder / f"{name}.log"
    with log.open("ab") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
             str(folder / "artifacts"), "--workers", "1", "--host", "127.0.0.1", "--port",
             str(port)], stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(url, process, log)
        yield url
    finally:
        stop(process)


def _start_training(url: str, model: Path, data: Path, out: Path, max_steps: int,
                    env: dict[str, str] | None = None) -> subprocess.Popen:
    args = ["train", "--model", str(model), "--data", str(data), "--max-steps", str(max_steps),
            "--batch-size", "2", "--experiment", EXPERIMENT,
            "--set", "training.logging_steps=1", "--set", "training.checkpoint_steps=-1",
            "--set", "training.eval_steps=100000", "--set", "data.max_eval_samples=2",
            "--set", f"training.output_dir={out / 'out'}",
            "--set", f"training.cache_dir={out / 'cache'}", "--set", "evaluation.batch_size=2",
            "--set", "evaluation.max_new_tokens=4"]
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": url, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "whisper_exp.cli", *args], env=full_env,
                            cwd=out, stdout=(out / "train.out").open("wb"),
                            stderr=(out / "train.err").open("wb"))


def _wait_for_steps(url: str, process: subprocess.Popen, out: Path, steps: int) -> str:
    """The run id once the server holds ``steps`` train/loss points."""
    client = MlflowClient(url)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert process.poll() is None, (out / "train.err").read_text()[-3000:]
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= steps:
            return runs[0].info.run_id
        time.sleep(0.5)
    pytest.fail("training logged no steps in 600 s")


def _journal(folder: Path) -> list[dict]:
    lines = (folder / JOURNAL_DIR / METRICS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _points(client: MlflowClient, run_id: str, key: str) -> set[tuple[int, float]]:
    """The server's distinct (step, value) points: MLflow stores a point logged twice in the
    same millisecond (``train/epoch`` comes with every Trainer log of a step) as one row."""
    return set(_history(client, run_id, key))


def test_outage_mid_training_loses_nothing(tiny_english_path, sample_dir, tmp_path):
    port = free_port()
    # Enough steps to outlast the server's shutdown on an idle machine (60 tiny-model steps
    # finished before the stop there, leaving no step inside the outage).
    max_steps = 300
    with tracking_server(tmp_path, port) as url:
        process = _start_training(url, tiny_english_path, sample_dir, tmp_path, max_steps)
        run_id = _wait_for_steps(url, process, tmp_path, 3)
    down = time.time()
    time.sleep(OUTAGE_S)
    assert process.poll() is None, "training died when the server went away"
    with tracking_server(tmp_path, port, "server-restarted") as url:
        back = time.time()
        rc = process.wait(timeout=900)
        err = (tmp_path / "train.err").read_text()
        assert rc == 0, err[-3000:]
        client = MlflowClient(url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        journal = _journal(Path(run.data.tags["whisper_exp.output_dir"]))
        during = [m for m in journal if m["key"] == "train/loss"
                  and down * 1000 < m["timestamp"] < back * 1000]
        assert during, "training kept stepping while the server was down"
        losses = _history(client, run_id, "train/loss")
        assert [step for step, _ in losses] == list(range(1, max_steps + 1)), \
            "every step's loss is on the server, those of the outage too"
        for key in {m["key"] for m in journal}:
            assert _points(client, run_id, key) == {
                (m["step"], m["value"]) for m in journal if m["key"] == key}, key
        assert "wer" in run.data.metrics
    assert "is unreachable" in err and "is back after" in err
    print(f"outage: server down {back - down:.0f} s (stopped {OUTAGE_S:g} s + restart); "
          f"{len(during)} steps trained meanwhile")


def test_server_never_back_keeps_the_run_on_disk_for_upload(tiny_english_path, sample_dir,
                                                            tmp_path):
    max_steps = 8
    old = tmp_path / "old"
    old.mkdir()
    with tracking_server(old, free_port()) as url:
        process = _start_training(url, tiny_english_path, sample_dir, tmp_path, max_steps,
                                  env={"WHISPER_EXP_TRACKING_WAIT_S": "3"})
        run_id = _wait_for_steps(url, process, tmp_path, 1)
    rc = process.wait(timeout=900)
    err = (tmp_path / "train.err").read_text()
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err
    folder = tmp_path / "out" / run_id
    assert err.strip().splitlines()[-1].startswith(f"error: tracking server {url} has been "
                                                    "unreachable for ")
    assert err.strip().endswith(f"send them when a server is up: whisper-exp upload-run "
                                f"{folder}")
    assert (folder / "model" / "model.safetensors").is_file() or \
        (folder / "model" / "adapter_model.safetensors").is_file()
    journal = _journal(folder)
    assert {m["step"] for m in journal if m["key"] == "train/loss"} == set(
        range(1, max_steps + 1))

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with tracking_server(fresh, free_port()) as new_url:
        mlflow.set_tracking_uri(new_url)
        result = CliRunner().invoke(main, ["upload-run", str(folder), "--tracking-uri",
                                           new_url])
        assert result.exit_code == 0, result.output
        client = MlflowClient(new_url)
        uploaded = result.output.split("run_id=", 1)[1].split()[0]
        run = client.get_run(uploaded)
        assert run.info.status == "FINISHED"
        assert run.data.tags["whisper_exp.uploaded_from"] == run_id
        assert run.data.params["training.max_steps"] == str(max_steps)
        for key in {m["key"] for m in journal}:
            assert _points(client, uploaded, key) == {
                (m["step"], m["value"]) for m in journal if m["key"] == key}, key
        names = {a.path for a in client.list_artifacts(uploaded)}
        assert {"config.yaml", "model"} <= names
        again = CliRunner().invoke(main, ["upload-run", str(folder), "--tracking-uri", new_url])
        assert again.output.strip().splitlines()[-1] == \
            f"run_id={uploaded} same run metrics=0 model=not sent"


def test_journal_queues_while_down_and_sends_when_up(tmp_path, monkeypatch):
    """(No server process: a closed loopback port, then the per-test SQLite store.)"""
    closed = f"http://127.0.0.1:{free_port()}"
    down = RunJournal(tmp_path / "down", "0" * 32, closed)
    started = time.monotonic()
    down.log_metrics({"a": 1.0}, step=1)
    down.log_metrics({"a": 2.0}, step=2)
    assert time.monotonic() - started < 10, "a step never waits on MLflow's retries"
    assert [(m.step, m.value) for m in down.pending] == [(1, 1.0), (2, 2.0)]
    assert [(m.step, m.value) for m in read_metrics(tmp_path / "down")] == [(1, 1.0), (2, 2.0)]
    monkeypatch.setenv(WAIT_ENV, "0")
    with pytest.raises(TrackingUnavailable) as caught:
        down.require_server()
    assert str(caught.value).endswith(f"whisper-exp upload-run {tmp_path / 'down'}")

    with mlflow.start_run() as run:
        up = RunJournal(tmp_path / "up", run.info.run_id)
        up.log_metrics({"b": 3.0}, step=5)
        up.require_server()
    assert not up.pending
    history = MlflowClient().get_metric_history(run.info.run_id, "b")
    assert [(m.step, m.value) for m in history] == [(5, 3.0)]
