"""Team set-up with configuration alone: an MLflow tracking server on PostgreSQL; Optuna
workers that survive a restart of their PostgreSQL storage."""

import base64
import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from mlflow.tracking import MlflowClient
from servers import free_port, model_server, running

from whisper_exp.config import load_config
from whisper_exp.evaluation import run_evaluation
from whisper_exp.registry import register_run
from whisper_exp.training import train


@pytest.fixture
def tracking_server(postgres_url, tmp_path, monkeypatch):
    """`mlflow server` on a fresh PostgreSQL database, artifacts proxied into tmp_path."""
    args = ["mlflow", "server", "--backend-store-uri", postgres_url,
            "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"]
    with running(args, tmp_path / "tracking-server.log") as (url, _):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        yield url


def test_train_evaluate_register_against_postgres_server(tracking_server, says_the_path,
                                                         sample_dir, tmp_path):
    cfg = load_config(None, {
        "model": {"name": str(says_the_path)},
        "data": {"train": str(sample_dir), "max_eval_samples": 2},
        "training": {"max_steps": 2, "batch_size": 2, "output_dir": str(tmp_path / "out"),
                     "cache_dir": str(tmp_path / "cache")},
        "evaluation": {"batch_size": 2, "max_new_tokens": 4},
        "tracking": {"experiment_name": "team"},
    })
    result = train(cfg)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts go via the server"
    assert "wer" in run.data.metrics
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/model",
                                                     dst_path=str(tmp_path / "dl")))
    assert (local / "adapter_model.safetensors").exists()
    assert any((tmp_path / "artifacts").rglob("adapter_model.safetensors")), \
        "the server stored the artifact under --artifacts-destination"

    report = run_evaluation(f"runs:/{result.run_id}", str(sample_dir), cfg)
    assert mlflow.get_run(report.run_id).info.status == "FINISHED"

    version = register_run(result.run_id, name="team-whisper", alias="champion")
    assert MlflowClient().get_model_version_by_alias("team-whisper", "champion").version \
        == version.version
    clip = base64.b64encode((sample_dir / "096090015.flac").read_bytes()).decode()
    with model_server("models:/team-whisper@champion", tmp_path / "serve.log",
                      cwd=tmp_path) as (url, _):
        answer = requests.post(f"{url}/invocations", timeout=120, json={
            "dataframe_records": [{"audio": clip}]})
    assert answer.status_code == 200, answer.text
    served = answer.json()["predictions"][0]["text"]
    registered = mlflow.pyfunc.load_model("models:/team-whisper@champion")
    assert served == registered.predict(pd.DataFrame({"audio": [clip]}))["text"][0]
    assert set(served.split()) == {"the"}, "says_the's transcript, through the server"


ROOT = Path(__file__).resolve().parent.parent
PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


class PrivatePostgres:
    """A PostgreSQL cluster of this test's own (initdb in a temporary folder, a free port), so
    restarting it disturbs no one else's database. Run as the ``postgres`` user when this
    process is root (initdb refuses root)."""

    def __init__(self) -> None:
        if not PG_BIN or not (Path(PG_BIN[-1]) / "initdb").exists():
            pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found in "
                        "/usr/lib/postgresql/*/bin: install the postgresql package")
        self.bin = Path(PG_BIN[-1])
        self.root = Path(tempfile.mkdtemp(prefix="whisper-exp-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_postgres():
    cluster = PrivatePostgres()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()


def _completed(storage: str, name: str) -> int:
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except Exception:  # noqa: BLE001 - not created yet, or the database is restarting
        return 0
    return sum(t.state.name == "COMPLETE" for t in study.trials)


def test_optuna_workers_survive_a_postgres_restart(private_postgres, tiny_english_path,
                                                   sample_dir, tmp_path):
    """Two `whisper-exp tune` workers on a PostgreSQL storage that is restarted (down a few
    seconds) mid-study: the study finishes, and every trial is in Optuna and MLflow once."""
    import optuna
    import yaml

    storage = private_postgres.url
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_english_path)},
        "data": {"train": str(sample_dir), "max_train_samples": 4, "max_eval_samples": 2},
        "training": {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "eval_steps": 1,
                     "output_dir": str(tmp_path / "outputs")},
        "evaluation": {"batch_size": 2, "max_new_tokens": 8},
        "tracking": {"experiment_name": "restart"},
    }))
    mlflow.set_experiment("restart")  # create the tracking DB once, before the workers race
    n_trials = 6
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "whisper_exp.cli", "tune", "--config", str(config),
               "--space", str(ROOT / "experiments" / "search" / "lora.yaml"),
               "--study-name", "restart", "--storage", storage, "--n-trials", str(n_trials),
               "--sampler", "random", "--pruner", "none"]
    logs = [(tmp_path / f"worker{i}.log").open("w") for i in range(2)]
    workers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT) for log in logs]
    deadline = time.monotonic() + 600
    while _completed(storage, "restart") < 1:
        assert all(w.poll() is None for w in workers), (tmp_path / "worker0.log").read_text()
        assert time.monotonic() < deadline, "no trial completed in 600 s"
        time.sleep(1)
    before = _completed(storage, "restart")
    private_postgres.stop()
    time.sleep(5)
    private_postgres.start()
    for worker in workers:
        worker.wait(timeout=900)
    outputs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-4000:]
    assert before < n_trials, "the restart came mid-study"

    study = optuna.load_study(study_name="restart", storage=storage)
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers))), "trial numbers never collide"
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert n_trials <= len(complete) <= n_trials + 1, [t.state.name for t in study.trials]
    runs = mlflow.search_runs(experiment_names=["restart"], output_format="list",
                              filter_string="tags.`optuna.study_name` = 'restart'")
    trial_runs = [r for r in runs if "optuna.trial_number" in r.data.tags]
    recorded = sorted(int(r.data.tags["optuna.trial_number"]) for r in trial_runs)
    assert recorded == numbers, "every trial appears exactly once in MLflow"
    for trial in complete:
        run = next(r for r in trial_runs if int(r.data.tags["optuna.trial_number"])
                   == trial.number)
        assert run.info.status == "FINISHED"
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
