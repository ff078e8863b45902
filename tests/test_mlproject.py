"""End to end through MLflow Projects: `mlflow run . -e train` then `-e evaluate runs:/<id>`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent


def _mlflow_run(args, cwd, env):
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_mlflow_run_train_then_evaluate(tiny_english_path, sample_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'e2e.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri,
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    _mlflow_run(["-e", "train", "--experiment-name", "e2e",
                 "-P", f"model={tiny_english_path}", "-P", f"data={sample_dir}",
                 "-P", "max_steps=2", "-P", "batch_size=2", "-P", "lora_r=8",
                 "-P", "freeze_encoder=true"], tmp_path, env)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["e2e"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert params["finetuning.lora.r"] == "8"
    assert params["finetuning.freeze_encoder"] == "True"
    assert params["training.max_steps"] == "2"
    assert params["finetuning.strategy"] == "lora"  # from experiments/lora.yaml
    for key in ("wer", "cer", "peak_memory_mb", "trainable_params", "eval_wer",
                "train_samples_per_second"):
        assert key in metrics, key
    # decoder only: layers x (self + cross attention) x (q, v) x (A + B = 2 * r * d_model)
    model_config = json.loads((tiny_english_path / "config.json").read_text())
    assert metrics["trainable_params"] == (model_config["decoder_layers"] * 2 * 2
                                           * (2 * 8 * model_config["d_model"]))
    names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "model")}
    assert "model/adapter_model.safetensors" in names

    _mlflow_run(["-e", "evaluate", "--experiment-name", "e2e",
                 "-P", f"model=runs:/{run.info.run_id}", "-P", f"data={sample_dir}"],
                tmp_path, env)
    evals = [r for r in mlflow.search_runs(experiment_names=["e2e"], output_format="list")
             if r.info.run_id != run.info.run_id]
    assert len(evals) == 1 and evals[0].info.status == "FINISHED"
    assert evals[0].data.params["data.n_utterances"] == "16"
    assert evals[0].data.params["model"] == f"runs:/{run.info.run_id}"
    assert {"wer", "cer"} <= set(evals[0].data.metrics)
