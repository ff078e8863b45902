"""The team server with MLflow's own authentication (``mlflow server --app-name basic-auth``),
tracking store and permission database on PostgreSQL: who gets in, who may write, and that no
whisper-exp command prints or logs the password it was given."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import mlflow
import psycopg
import pytest
from click.testing import CliRunner
from conftest import POSTGRES_ADMIN
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient
from servers import running

from whisper_exp.cli import main
from whisper_exp.preflight import refusal

EXPERIMENT = "team-auth"
MODEL_NAME = "team-auth-whisper"


@contextlib.contextmanager
def fresh_databases(count: int) -> Iterator[list[str]]:
    """``count`` new PostgreSQL databases (dropped afterwards); skipped without PostgreSQL."""
    try:
        admin = psycopg.connect(POSTGRES_ADMIN, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN}: {exc}")
    names = [f"whisper_exp_auth_{uuid.uuid4().hex[:12]}" for _ in range(count)]
    try:
        for name in names:
            admin.execute(f'CREATE DATABASE "{name}"')
        yield [POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}" for name in names]
    finally:
        for name in names:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _as(patch: pytest.MonkeyPatch, user: str | None, password: str | None = None) -> None:
    for name, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            patch.delenv(name, raising=False)
        else:
            patch.setenv(name, value)


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """The README's set-up: basic-auth server, permission DB beside the tracking DB, no access
    by default; an experiment with a READ user and an EDIT user (made with AuthServiceClient)."""
    root = tmp_path_factory.mktemp("auth-server")
    passwords = {user: secrets.token_urlsafe(16) for user in ("admin", "reader", "editor")}
    with fresh_databases(2) as (tracking_db, auth_db), pytest.MonkeyPatch.context() as patch:
        ini = root / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                       f"database_uri = {auth_db}\nadmin_username = admin\n"
                       f"admin_password = {passwords['admin']}\n"
                       "auth_cache_ttl_seconds = 60\n"
                       "authorization_function = "
                       "mlflow.server.auth:authenticate_request_basic_auth\n")
        env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini),
               "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
        args = ["mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri", tracking_db,
                "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
        with running(args, root / "server.log", env=env) as (url, _):
            _as(patch, "admin", passwords["admin"])
            auth = get_app_client("basic-auth", tracking_uri=url)
            for user in ("reader", "editor"):
                auth.create_user(user, passwords[user])
            experiment_id = MlflowClient(url).create_experiment(EXPERIMENT)
            auth.grant_user_permission("reader", "experiment", experiment_id, "READ")
            auth.grant_user_permission("editor", "experiment", experiment_id, "EDIT")
            patch.undo()
            yield SimpleNamespace(url=url, auth=auth, passwords=passwords,
                                  experiment_id=experiment_id, log=root / "server.log")


@pytest.fixture
def client_env(team, monkeypatch):
    """This test talks to the team server (not the per-test SQLite store)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.url)
    mlflow.set_tracking_uri(team.url)
    _as(monkeypatch, None)
    return monkeypatch


def _train_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--max-steps", "1",
            "--batch-size", "2", "--experiment", EXPERIMENT,
            "--set", "data.max_eval_samples=2", "--set", f"training.output_dir={out / 'out'}",
            "--set", f"training.cache_dir={out / 'cache'}", "--set", "evaluation.batch_size=2",
            "--set", "evaluation.max_new_tokens=4", "--set", "tracking.system_metrics=false"]


def _one_line_error(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def test_no_or_wrong_credentials_get_one_clear_line(team, client_env, tmp_path):
    """A new user's command line without a login: exit 2, one line naming the server and the
    variables to set, no traceback. The server itself answered 401."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_USER")}
    done = subprocess.run([sys.executable, "-m", "whisper_exp.cli", "evaluate", "--model",
                           str(tmp_path / "m"), "--data", str(tmp_path / "d")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    line = _one_line_error(done.stderr)
    assert line == (f"error: tracking server {team.url} refused the request (HTTP 401): set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account with "
                    "access")
    _as(client_env, "editor", "not-" + team.passwords["editor"])
    result = CliRunner().invoke(main, ["register", "--run", "0" * 32])
    assert result.exit_code == 2
    assert "refused the request (HTTP 401)" in _one_line_error(result.output)


def _texts_under(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()
                     and p.stat().st_size < 5_000_000)


def test_edit_user_trains_evaluates_registers_and_read_user_cannot_write(
        team, client_env, says_the_path, sample_dir, tmp_path):
    editor_pw = team.passwords["editor"]
    _as(client_env, "editor", editor_pw)
    done = subprocess.run([sys.executable, "-m", "whisper_exp.cli",
                           *_train_args(says_the_path, sample_dir, tmp_path)],
                          env=dict(os.environ), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = done.stdout.split("run_id=", 1)[1].split()[0]
    client = MlflowClient(team.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == team.experiment_id

    result = CliRunner().invoke(main, ["evaluate", "--model", f"runs:/{run_id}", "--data",
                                       str(sample_dir), "--experiment", EXPERIMENT,
                                       "--set", "data.max_eval_samples=2",
                                       "--set", "evaluation.batch_size=2",
                                       "--set", "evaluation.max_new_tokens=4"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["register", "--run", run_id, "--name", MODEL_NAME,
                                       "--alias", "champion"])
    assert result.exit_code == 0, result.output
    version = client.get_model_version_by_alias(MODEL_NAME, "champion").version
    served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    assert served.metadata.run_id, "the editor can load what it registered (serving's path)"

    # Nothing the runs recorded, nor what the commands printed, holds the password.
    runs = client.search_runs([team.experiment_id])
    assert len(runs) >= 2
    artifacts = tmp_path / "artifacts"
    for each in runs:
        recorded = repr(each.data.params) + repr(each.data.tags) + repr(each.data.metrics)
        assert editor_pw not in recorded
        mlflow.artifacts.download_artifacts(run_id=each.info.run_id,
                                            dst_path=str(artifacts / each.info.run_id))
    assert (artifacts / run_id / "config.yaml").is_file()
    for text in (_texts_under(artifacts), _texts_under(tmp_path / "out"),
                 done.stdout, done.stderr, result.output):
        assert editor_pw not in text

    # READ on the experiment and the model: can look, cannot add runs or move the alias.
    with pytest.MonkeyPatch.context() as admin:
        _as(admin, "admin", team.passwords["admin"])
        team.auth.grant_user_permission("reader", "registered_model", MODEL_NAME, "READ")
    _as(client_env, "reader", team.passwords["reader"])
    assert MlflowClient(team.url).get_run(run_id).info.status == "FINISHED"
    result = CliRunner().invoke(main, _train_args(says_the_path, sample_dir, tmp_path))
    assert result.exit_code == 2, result.output
    assert _one_line_error(result.output) == (
        f"error: tracking server {team.url} refused creating a run in the experiment for user "
        "'reader' (HTTP 403, permission denied): ask the server's admin for EDIT (or MANAGE) "
        "permission on it, or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an "
        "account that has it")
    assert len(client.search_runs([team.experiment_id])) == len(runs), "no run was created"

    with pytest.raises(MlflowException) as caught:
        MlflowClient(team.url).set_registered_model_alias(MODEL_NAME, "champion", version)
    assert "refused moving a registered model's alias for user 'reader' (HTTP 403" in str(
        refusal(caught.value))
    result = CliRunner().invoke(main, ["register", "--run", run_id, "--name", MODEL_NAME,
                                       "--alias", "champion"])
    assert result.exit_code == 2, result.output
    # (MLflow's download progress bars come first: register packages the model, then logs it
    # into the run, which READ may not.)
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(
        f"error: tracking server {team.url} refused updating the run for user 'reader' (HTTP 403")
    _as(client_env, "editor", editor_pw)
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == version


@pytest.mark.parametrize("code, endpoint, user, expected", [
    ("PERMISSION_DENIED", "/api/2.0/mlflow/runs/create", "ana",
     "refused creating a run in the experiment for user 'ana' (HTTP 403, permission denied)"),
    ("PERMISSION_DENIED", "/api/2.0/mlflow/registered-models/alias", "ana",
     "refused moving a registered model's alias for user 'ana' (HTTP 403"),
    ("UNAUTHENTICATED", "/api/2.0/mlflow/runs/create", None,
     "refused creating a run in the experiment (HTTP 401, not logged in): set "
     "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
])
def test_refusals_name_the_action_and_user_never_the_password(code, endpoint, user, expected,
                                                              monkeypatch):
    """(Without a server: the message for each kind of refusal; the live ones run above.)"""
    from mlflow.protos.databricks_pb2 import ErrorCode

    _as(monkeypatch, user, "pw-must-not-show" if user else None)
    exc = MlflowException(f"API request to endpoint {endpoint} failed with error code 403 != "
                          "200. Response body: 'Permission denied'",
                          error_code=ErrorCode.Value(code))
    message = str(refusal(exc, "http://u:secret@127.0.0.1:5000"))
    assert message.startswith("tracking server http://u:***@127.0.0.1:5000 " + expected)
    assert "pw-must-not-show" not in message and "secret" not in message
    assert refusal(MlflowException("boom"), "http://127.0.0.1:5000") is None
    assert refusal(ValueError("no"), "http://127.0.0.1:5000") is None
