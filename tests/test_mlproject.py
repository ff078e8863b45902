"""End to end through MLflow Projects: `mlflow run . -e train` then `-e evaluate runs:/<id>`,
each setting logged once (MLflow logs every entry-point parameter as a run param)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from whisper_exp.config import NAMED_OPTIONS

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
# Params a run logs itself under the name of an MLproject parameter, with the same value.
SHARED_NAMES = {"evaluate": {"model", "data", "compare_with"}}


def _mlflow_run(args, cwd, env):
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _assert_each_setting_once(params, entry_point):
    """No MLproject parameter is a config key under another name (``strategy`` beside
    ``finetuning.strategy``): config keys are logged once, dotted, by the run itself."""
    declared = set(ENTRY_POINTS[entry_point]["parameters"])
    short = {k for k in params if "." not in k}
    leaves = {k.rsplit(".", 1)[1] for k in params if "." in k}
    assert declared <= set(params), "mlflow run logs every entry-point parameter"
    assert not short & leaves, f"{short & leaves} logged dotted and short"
    assert not (declared - SHARED_NAMES.get(entry_point, set())) & set(NAMED_OPTIONS), \
        "a config key is set through `set`, not a parameter of its own"


def test_mlproject_parameters_are_not_config_keys():
    for name, entry in ENTRY_POINTS.items():
        named = set(entry["parameters"]) & set(NAMED_OPTIONS)
        assert named <= SHARED_NAMES.get(name, set()), f"{name}: {named} duplicate config keys"


def test_params_mlflow_run_logged_quoted_are_kept():
    """`mlflow run` logs the shell-quoted value (``''`` for empty, ``'a b'``); the run logging
    the same value plainly must not fail on MLflow's "changing a param" check."""
    from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_ENTRY_POINT

    from whisper_exp import tracking

    client = MlflowClient()
    launched = client.create_run(client.get_experiment_by_name("Default").experiment_id,
                                 tags={MLFLOW_PROJECT_ENTRY_POINT: "evaluate"})
    client.log_batch(launched.info.run_id, params=[
        mlflow.entities.Param("compare_with", "''"),
        mlflow.entities.Param("data", "'/my data/dev'")])
    with tracking.run(run_id=launched.info.run_id):
        tracking.log_params({"compare_with": None, "data": "/my data/dev", "model": "m"})
    params = client.get_run(launched.info.run_id).data.params
    assert params == {"compare_with": "''", "data": "'/my data/dev'", "model": "m"}


def test_tune_study_name_and_direction_pass_through_under_their_logged_names():
    """Undeclared, so MLflow logs them only when given, under the names the study's run logs
    them, and forwards them as --study_name / --direction."""
    import shlex

    from mlflow.projects._project_spec import load_project

    from whisper_exp.cli import main

    entry = load_project(str(ROOT)).get_entry_point("tune")
    assert not {"study_name", "direction"} & set(entry.parameters)
    argv = shlex.split(entry.compute_command({"study_name": "my study", "direction": "maximize"},
                                             storage_dir=None))
    parsed = main.commands["tune"].make_context("tune", argv[4:]).params
    assert parsed["study_name"] == "my study" and parsed["direction"] == "maximize"


def test_mlflow_run_train_then_evaluate(tiny_english_path, sample_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'e2e.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri,
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    overrides = (f"model.name={tiny_english_path} data.train={sample_dir} training.max_steps=2 "
                 "training.batch_size=2 finetuning.lora.r=8 finetuning.freeze_encoder=true")
    _mlflow_run(["-e", "train", "--experiment-name", "e2e", "-P", f"set={overrides}"],
                tmp_path, env)
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
    assert params["model.name"] == str(tiny_english_path)
    _assert_each_setting_once(params, "train")
    for short in ("strategy", "max_steps", "lora_r", "model", "data"):
        assert short not in params, f"{short} is logged only under its config key"
    for key in ("wer", "cer", "peak_memory_mb", "trainable_params", "eval/wer",
                "train_samples_per_second"):
        assert key in metrics, key
    # decoder only: layers x (self + cross attention) x (q, v) x (A + B = 2 * r * d_model)
    model_config = json.loads((tiny_english_path / "config.json").read_text())
    assert metrics["trainable_params"] == (model_config["decoder_layers"] * 2 * 2
                                           * (2 * 8 * model_config["d_model"]))
    names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "model")}
    assert "model/adapter_model.safetensors" in names

    _mlflow_run(["-e", "evaluate", "--experiment-name", "e2e",
                 "-P", f"model=runs:/{run.info.run_id}", "-P", f"data={sample_dir}",
                 "-P", "set=evaluation.num_beams=2"], tmp_path, env)
    evals = [r for r in mlflow.search_runs(experiment_names=["e2e"], output_format="list")
             if r.info.run_id != run.info.run_id]
    assert len(evals) == 1 and evals[0].info.status == "FINISHED"
    assert evals[0].data.params["data.n_utterances"] == "16"
    assert evals[0].data.params["model"] == f"runs:/{run.info.run_id}"
    assert {"wer", "cer"} <= set(evals[0].data.metrics)
    assert evals[0].data.params["evaluation.num_beams"] == "2"
    assert "num_beams" not in evals[0].data.params
    _assert_each_setting_once(evals[0].data.params, "evaluate")
