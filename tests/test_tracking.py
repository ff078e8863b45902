import json
import os
from pathlib import Path

import mlflow
import pytest
import torch

from whisper_exp import registry, tracking


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


def test_peak_memory_on_cpu_is_the_process_peak_rss_in_mib():
    """Between the current RSS and the kernel's lifetime maximum, in MiB (not KiB or bytes)."""
    import resource

    status = dict(line.split(":", 1)
                  for line in Path("/proc/self/status").read_text().splitlines())
    rss_mb = int(status["VmRSS"].split()[0]) / 1024
    mb, kind = tracking.peak_memory_mb(torch.device("cpu"))
    lifetime_max_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    assert kind == "process_peak_rss"
    assert rss_mb <= mb <= lifetime_max_mb + 1, (rss_mb, mb, lifetime_max_mb)


# --------------------------------------------------------------------------- run pages


def _train_cfg(model, data, tmp_path, **tracking_keys):
    from whisper_exp.config import load_config

    return load_config(None, {
        "model": {"name": str(model)},
        "data": {"train": str(data), "max_eval_samples": 2, "max_train_samples": 4},
        "finetuning": {"strategy": "lora"},
        "training": {"max_steps": 1, "batch_size": 2, "logging_steps": 1,
                     "output_dir": str(tmp_path / "outputs")},
        "evaluation": {"batch_size": 2, "max_new_tokens": 4},
        "tracking": {"experiment_name": "pages", **tracking_keys},
    })


@pytest.fixture(scope="module")
def trained_run(tiny_english_path, sample_dir, tmp_path_factory):
    """One tiny LoRA train run in its own store, shared by the run-page checks."""
    from whisper_exp.training import train

    root = tmp_path_factory.mktemp("pages")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    previous = os.getcwd()
    os.chdir(root)
    try:
        result = train(_train_cfg(tiny_english_path, sample_dir, root))
    finally:
        os.chdir(previous)
    return uri, result


@pytest.fixture
def pages_store(trained_run, monkeypatch):
    uri, result = trained_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return result


def test_train_run_logs_its_model_with_linked_metrics(pages_store):
    result = pages_store
    run = mlflow.get_run(result.run_id)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         output_format="list")
    assert [m.source_run_id for m in models] == [result.run_id]
    model = models[0]
    assert model.tags[registry.PACKAGING_TAG] == "adapter only", "LoRA: adapter, not a copy"
    assert model.params["finetuning.strategy"] == "lora"
    linked = {m.key: m for m in model.metrics}
    assert linked["wer"].value == run.data.metrics["wer"]
    assert linked["wer"].dataset_name == "sample-eval" and linked["wer"].dataset_digest
    assert "peak_memory_mb" in linked and linked["peak_memory_mb"].dataset_name is None
    best = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                       order_by=[{"field_name": "metrics.wer",
                                                  "ascending": True}],
                                       output_format="list")
    assert best[0].model_id == model.model_id, "findable by metric"
    from whisper_exp.modeling import resolve_model_reference

    local = Path(resolve_model_reference(model.model_uri))
    assert (local / "adapter_config.json").exists() and not (local / "model.safetensors").exists()


def test_train_run_logs_datasets_with_source_digest_and_profile(pages_store, sample_dir):
    run = mlflow.get_run(pages_store.run_id)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "evaluation"}
    train_set, eval_set = inputs["training"], inputs["evaluation"]
    assert json.loads(train_set.source) == {"uri": str(sample_dir.resolve())}
    assert train_set.source_type == "local"
    profile = json.loads(train_set.profile)
    assert profile["utterances"] == 4 and profile["rows_skipped"] == 0
    assert 0 < profile["hours"] < 0.1 and profile["speakers"] >= 1
    assert profile["text_case"].startswith("auto")
    assert json.loads(eval_set.profile)["utterances"] == 2
    assert train_set.digest != eval_set.digest


def test_digest_follows_audio_and_transcripts():
    from whisper_exp.run_page import content_digest

    base = content_digest(["a", "b"], ["Hello.", "Bye."])
    assert content_digest(["b", "a"], ["Bye.", "Hello."]) == base, "row order is not content"
    assert content_digest(["a", "b"], ["Hello.", "Bye!"]) != base, "a transcript changed"
    assert content_digest(["a", "c"], ["Hello.", "Bye."]) != base, "an audio file changed"


def test_train_run_page_description_experiment_kind_and_system_metrics(pages_store):
    run = mlflow.get_run(pages_store.run_id)
    description = run.data.tags["mlflow.note.content"]
    assert "**lora** fine-tune" in description and "sample-train" in description
    assert f"{100 * run.data.metrics['wer']:.2f}%" in description
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), \
        "system metrics are on by default"


def test_system_metrics_off_by_config(tiny_english_path, sample_dir, tmp_path):
    from whisper_exp.training import train

    result = train(_train_cfg(tiny_english_path, sample_dir, tmp_path, system_metrics=False))
    metrics = mlflow.get_run(result.run_id).data.metrics
    assert "wer" in metrics and not any(k.startswith("system/") for k in metrics)


def test_evaluate_run_logs_its_dataset_and_description(tiny_english_path, says_the_path,
                                                       sample_dir):
    from whisper_exp.config import load_config
    from whisper_exp.evaluation import run_evaluation

    cfg = load_config(None, {"data": {"max_eval_samples": 2},
                             "evaluation": {"batch_size": 2, "max_new_tokens": 4}})
    report = run_evaluation(str(says_the_path), str(sample_dir), cfg,
                            compare_with=str(tiny_english_path))
    run = mlflow.get_run(report.run_id)
    [only] = run.inputs.dataset_inputs
    assert only.tags[0].value == "evaluation" and only.dataset.name == "sample"
    assert json.loads(only.dataset.profile)["utterances"] == 2
    description = run.data.tags["mlflow.note.content"]
    base, tuned = run.data.metrics["base_wer"], run.data.metrics["wer"]
    assert f"{100 * base:.2f}% → {100 * tuned:.2f}%" in description
    assert str(tiny_english_path) in description


def test_mlflow_run_without_experiment_name_says_where_the_run_went(monkeypatch, caplog):
    """`mlflow run` picks the experiment before our code runs: configure cannot move the run,
    so it says so instead of silently leaving it in Default."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    with caplog.at_level("WARNING", logger="whisper_exp.tracking"):
        tracking.configure(None, "whisper-exp")
    assert "--experiment-name whisper-exp" in caplog.text
    assert mlflow.get_experiment_by_name("whisper-exp") is None, "nothing created elsewhere"
    caplog.clear()
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", mlflow.create_experiment("whisper-exp"))
    tracking.configure(None, "whisper-exp")
    assert "--experiment-name" not in caplog.text
