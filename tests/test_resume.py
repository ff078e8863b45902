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
    steps_before = [m.step for m in MlflowClient().get_metric_history(run_id, "train/loss")]
    assert steps_before and max(steps_before) < MAX_STEPS

    done = subprocess.run(_train_cmd("--resume", run_id), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["global_steps"] == MAX_STEPS
    assert run.data.tags["resumed_from"].startswith("checkpoint-")
    steps_after = [m.step for m in MlflowClient().get_metric_history(run_id, "train/loss")]
    assert max(steps_after) == MAX_STEPS and set(steps_before) <= set(steps_after)
    assert len(mlflow.search_runs(experiment_names=["resume"], output_format="list")) == 1
    assert (out / run_id / "model" / "adapter_model.safetensors").exists()


def test_resume_refuses_finished_or_unknown_runs(tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = subprocess.run(_train_cmd("--resume", "0" * 32), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "cannot resume run" in done.stderr


class _CrashAt:
    """A Trainer callback that raises at a given step, like a crash mid-run."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Crash(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise RuntimeError("simulated crash")

        return Crash()


def _crashing_run(model, data, tmp_path, monkeypatch, crash_at, checkpoint_steps):
    """A run started the way `mlflow run --experiment-name elsewhere` starts one (experiment
    from the environment, not the config), with a relative output_dir, crashing at a step."""
    import pytest

    from whisper_exp.config import load_config
    from whisper_exp.training import train

    experiment_id = mlflow.create_experiment("elsewhere")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    started_in = tmp_path / "started_here"
    started_in.mkdir()
    monkeypatch.chdir(started_in)
    cfg = load_config(None, {
        "model": {"name": str(model)}, "data": {"train": str(data), "max_eval_samples": 2},
        "finetuning": {"freeze_encoder": True},
        "training": {"max_steps": 6, "batch_size": 2, "logging_steps": 1, "eval_steps": 1000,
                     "checkpoint_steps": checkpoint_steps, "output_dir": "outputs",
                     "cache_dir": str(tmp_path / "cache")},
        "evaluation": {"max_new_tokens": 4}})
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, callbacks=[_CrashAt(crash_at)])
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    elsewhere = tmp_path / "resumed_from_here"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (run,) = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list")
    return run, experiment_id


def test_resume_finds_the_run_and_its_checkpoints_from_anywhere(tiny_english_path, sample_dir,
                                                                 tmp_path, monkeypatch):
    from whisper_exp.training import resume

    run, experiment_id = _crashing_run(tiny_english_path, sample_dir, tmp_path, monkeypatch,
                                       crash_at=5, checkpoint_steps=2)
    assert run.info.status == "FAILED"
    # The last checkpoint was cut short (a full disk, a kill mid-save): the one before is used.
    trainer_dir = tmp_path / "started_here" / "outputs" / run.info.run_id / "trainer"
    assert sorted(p.name for p in trainer_dir.glob("checkpoint-*")) == ["checkpoint-2",
                                                                        "checkpoint-4"]
    (trainer_dir / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')
    result = resume(run.info.run_id)
    done = mlflow.get_run(run.info.run_id)
    assert done.info.status == "FINISHED" and done.info.experiment_id == experiment_id
    assert done.data.tags["resumed_from"] == "checkpoint-2", "not restarted at step 0"
    assert done.data.metrics["global_steps"] == 6
    assert result.model_dir.is_relative_to(tmp_path / "started_here" / "outputs")


def test_resume_refuses_a_run_without_a_checkpoint(tiny_english_path, sample_dir, tmp_path,
                                                   monkeypatch):
    import pytest

    from whisper_exp.config import ConfigError
    from whisper_exp.training import resume

    run, _ = _crashing_run(tiny_english_path, sample_dir, tmp_path, monkeypatch, crash_at=1,
                           checkpoint_steps=-1)
    with pytest.raises(ConfigError, match="no checkpoint in .*nothing was restarted"):
        resume(run.info.run_id)
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED", "left as it was"
