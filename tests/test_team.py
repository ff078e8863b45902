"""Team set-up with configuration alone: an MLflow tracking server on PostgreSQL."""

import base64
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from mlflow.tracking import MlflowClient
from servers import model_server, running

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
