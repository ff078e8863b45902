import mlflow
import pytest
import torch

from whisper_exp import tracking


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "KILLED"),
                                           (RuntimeError, "FAILED")])
def test_interrupted_runs_keep_what_they_logged(error, status):
    with pytest.raises(error), tracking.run(run_name="x") as active:
        mlflow.log_metric("partial", 1.0)
        raise error()
    run = mlflow.get_run(active.info.run_id)
    assert run.info.status == status
    assert run.data.metrics["partial"] == 1.0


def test_finished_run():
    with tracking.run() as active:
        tracking.log_params({"a": None, "b": 1})
    run = mlflow.get_run(active.info.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a": "", "b": "1"}


def test_peak_memory_on_cpu_is_process_rss():
    mb, kind = tracking.peak_memory_mb(torch.device("cpu"))
    assert kind == "process_peak_rss" and mb > 10
