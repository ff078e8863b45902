"""An unreachable tracking store stops a command within seconds, in one line, before any work.

Before this check, ``whisper-exp evaluate`` against a server that was not up retried for about
5 minutes and ended in a traceback. The closed port is a real loopback port nobody listens on.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time

import mlflow
import pytest
from click.testing import CliRunner
from servers import free_port

from whisper_exp.cli import main
from whisper_exp.preflight import PreflightError, check_tracking_uri

LIMIT_S = 5.0


@pytest.fixture
def closed_url(monkeypatch) -> str:
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    return url


def _no_work(*args, **kwargs):
    raise AssertionError("work started although the tracking server is unreachable")


@pytest.mark.parametrize("command, target", [
    (["evaluate", "--model", "m", "--data", "d"], "whisper_exp.evaluation.run_evaluation"),
    (["train"], "whisper_exp.training.train"),
    (["train", "--resume", "0" * 32], "whisper_exp.training.resume"),
    (["tune"], "whisper_exp.tuning.tune"),
    (["register", "--run", "0" * 32], "whisper_exp.registry.register_run"),
])
def test_unreachable_server_stops_the_command_in_one_line(closed_url, command, target,
                                                          monkeypatch):
    monkeypatch.setattr(target, _no_work)
    started = time.monotonic()
    result = CliRunner().invoke(main, command)
    elapsed = time.monotonic() - started
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: tracking server {closed_url} is "
                                                   "unreachable"), result.output
    assert "MLFLOW_TRACKING_URI" in lines[0]
    assert elapsed < LIMIT_S


def test_evaluate_process_against_a_closed_port_ends_without_traceback(tmp_path):
    """The real command line, as a new user runs it."""
    url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "whisper_exp.cli", "evaluate", "--model",
                           str(tmp_path / "model"), "--data", str(tmp_path / "data")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: tracking server {url} is unreachable")
    assert elapsed < 60, "imports included; the check itself is bounded by LIMIT_S"


def test_database_uris_fail_fast_with_the_password_hidden(monkeypatch):
    uri = f"postgresql://user:s3cret@127.0.0.1:{free_port()}/mlflow"
    started = time.monotonic()
    with pytest.raises(PreflightError) as caught:
        check_tracking_uri(uri)
    assert time.monotonic() - started < LIMIT_S
    assert "unreachable" in str(caught.value) and "s3cret" not in str(caught.value)
    assert "user:***@127.0.0.1" in str(caught.value)
    with pytest.raises(PreflightError, match="does not exist"):
        check_tracking_uri("sqlite:////no/such/folder/mlflow.db")


def test_tune_checks_the_optuna_storage(monkeypatch, tmp_path):
    monkeypatch.setattr("whisper_exp.tuning.tune", _no_work)
    storage = f"postgresql://optuna@127.0.0.1:{free_port()}/optuna"
    result = CliRunner().invoke(main, ["tune", "--storage", storage])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: Optuna storage {storage} is unreachable")


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 401

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, expected", [
    (200, None),
    (401, "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    (503, "answered HTTP 503"),
])
def test_a_server_that_answers_passes_unless_it_refuses(status, expected, tmp_path):
    """(A live ``mlflow server`` takes ~50 s to start on the 2-core CI machine; test_team's
    PostgreSQL-backed server runs the passing path for real.)"""
    handler = type("Handler", (_Answer,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        if expected is None:
            check_tracking_uri(url)
        else:
            with pytest.raises(PreflightError, match=expected):
                check_tracking_uri(url)
    finally:
        server.shutdown()
        server.server_close()
    check_tracking_uri(f"sqlite:///{tmp_path / 'fresh.db'}")
