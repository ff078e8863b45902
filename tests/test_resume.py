"""Crash safety: kill -9 a training process after its first checkpoint, resume the same run."""

import os
import signal
import subprocess
import sys
import time

import mlflow
from mlflow.tracking import MlflowClient

MAX_STEPS = 24


def _train_cmd(*args):
    return [sys.executable, "-m", "whisper_exp.cli", "train", *args]


def test_kill_dash_nine_then_resume_finishes_the_same_run(tiny_english_path, sample_dir,
                                                          tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    out = tmp_path / "out"
    settings = ["--set", f"training.max_steps={MAX_STEPS}", "--set", "training.checkpoint_steps=4",
                "--set", "training.batch_size=2", "--set", "training.logging_steps=1",
                "--set", f"training.output_dir={out}", "--set", "training.eval_steps=1000",
                "--set", "data.max_eval_samples=2", "--set", "evaluation.max_new_tokens=4",
                "--set", f"training.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.Popen(
        _train_cmd("--model", str(tiny_english_path), "--data", str(sample_dir),
                   "--experiment", "resume", *settings),
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    deadline = time.monotonic() + 300
    checkpoint = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = sorted(out.glob("*/trainer/checkpoint-*/trainer_state.json"))
        if found:
            checkpoint = found[0].parent
            break
        time.sleep(0.2)
    assert checkpoint is not None, f"no checkpoint before exit: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_id = checkpoint.parent.parent.name

    mlflow.set_tracking_uri(uri)
    killed = mlflow.get_run(run_id)
    assert killed.info.status == "RUNNING", "kill -9 leaves no chance to close the run"
    steps_before = [m.step for m in MlflowClient().get_metric_history(run_id, "train_loss")]
    assert steps_before and max(steps_before) < MAX_STEPS

    done = subprocess.run(_train_cmd("--resume", run_id), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["global_steps"] == MAX_STEPS
    assert run.data.tags["resumed_from"].startswith("checkpoint-")
    steps_after = [m.step for m in MlflowClient().get_metric_history(run_id, "train_loss")]
    assert max(steps_after) == MAX_STEPS and set(steps_before) <= set(steps_after)
    assert len(mlflow.search_runs(experiment_names=["resume"], output_format="list")) == 1
    assert (out / run_id / "model" / "adapter_model.safetensors").exists()


def test_resume_refuses_finished_or_unknown_runs(tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = subprocess.run(_train_cmd("--resume", "0" * 32), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "cannot resume run" in done.stderr
