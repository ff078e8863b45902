"""Multi-process training through torchrun (gloo on CPU): one MLflow run, logged by rank 0."""

import os
import subprocess
import sys

import mlflow


def test_torchrun_two_processes_log_one_run(tiny_english_path, sample_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "whisper_exp.cli", "train", "--model", str(tiny_english_path),
           "--data", str(sample_dir), "--experiment", "ddp",
           "--set", "training.max_steps=2", "--set", "training.batch_size=2",
           "--set", "training.logging_steps=1", "--set", f"training.output_dir={tmp_path}/out",
           "--set", "data.max_eval_samples=2", "--set", "evaluation.max_new_tokens=4",
           "--set", f"training.cache_dir={tmp_path}/cache"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["ddp"], output_format="list")
    assert len(runs) == 1, "only rank 0 creates and logs the run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["training.world_size"] == "2"
    assert run.data.params["training.effective_batch_size"] == "4"
    assert run.data.metrics["global_steps"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [run.info.run_id]
