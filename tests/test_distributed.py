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
           "--set", f"training.cache_dir={tmp_path}/cache",
           "--set", "finetuning.freeze_encoder=true"]
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
    # The encoder cache: each rank computes its share on the shared disk, reads the other's.
    assert run.data.params["cache.encoder_active"] == "True"
    n = int(run.data.params["data.n_train"]) + int(run.data.params["data.n_eval"])
    per_rank = [run.data.metrics[f"cache_encoder_computed_rank{r}"] for r in (0, 1)]
    assert sum(per_rank) == run.data.metrics["cache_encoder_computed"] == n
    assert all(0 < computed < n for computed in per_rank), per_rank


def test_a_plain_process_is_rank_0_of_1_without_a_process_group():
    """The rank helpers ask accelerate, which must not need torchrun or start a group."""
    import torch.distributed

    from whisper_exp import tracking

    assert (tracking.process_rank(), tracking.world_size()) == (0, 1)
    assert tracking.Tracker().enabled
    assert not torch.distributed.is_initialized()
