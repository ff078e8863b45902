"""`whisper-exp compare`: the strategy table over logged runs (made here with known params and
metrics, no training), printed and logged with its plot."""

import math

import mlflow
import pytest

from whisper_exp.compare import (
    CompareError,
    compare_runs,
    format_table,
    strategy_label,
)

RUNS = {
    "lora": ({"finetuning.strategy": "lora", "finetuning.lora.r": "32",
              "finetuning.freeze_encoder": "False", "finetuning.freeze_encoder_layers": ""},
             {"wer": 0.12, "cer": 0.05, "trainable_params": 1.5e6, "train_runtime_s": 300,
              "train_samples_per_second": 20.0, "peak_memory_mb": 3000,
              "wer_orthographic": 0.3, "ins_rate": 0.02, "loop_share": 0.0,
              "loop_share_delta": -0.01}),
    "full": ({"finetuning.strategy": "full", "finetuning.freeze_encoder": "False",
              "finetuning.freeze_encoder_layers": "2"},
             {"wer": 0.10, "cer": 0.04, "trainable_params": 3.7e7, "train_runtime_s": 900,
              "train_samples_per_second": 7.0, "peak_memory_mb": 8000,
              "wer_orthographic": 0.25, "ins_rate": 0.03, "loop_share": 0.05}),
}


def _make_runs(experiment: str) -> dict[str, str]:
    mlflow.set_experiment(experiment)
    ids = {}
    for name, (params, metrics) in RUNS.items():
        with mlflow.start_run(run_name=name, tags={"whisper_exp.entry_point": "train"}) as run:
            mlflow.log_params(params)
            mlflow.log_metrics(metrics)
        ids[name] = run.info.run_id
    with mlflow.start_run(run_name="eval", tags={"whisper_exp.entry_point": "evaluate"}):
        mlflow.log_metric("wer", 0.5)
    with mlflow.start_run(run_name="crashed", tags={"whisper_exp.entry_point": "train"}):
        mlflow.log_metric("wer", 0.01)
        mlflow.end_run("FAILED")
    return ids


def test_strategy_table_from_an_experiment_is_logged_with_its_plot():
    ids = _make_runs("strategies")
    comparison = compare_runs(experiment="strategies")
    rows = comparison.rows
    assert [r["run_id"] for r in rows] == [ids["full"], ids["lora"]], \
        "finished train runs only, best WER first"
    full, lora = rows
    assert full["strategy"] == "full freeze_encoder_layers=2"
    assert lora["strategy"] == "lora r=32"
    assert (lora["trainable_params"], lora["train_time_s"], lora["samples_per_s"],
            lora["peak_memory_mb"], lora["wer"], lora["cer"], lora["wer_orthographic"],
            lora["ins_rate"], lora["loop_share"]) == (1.5e6, 300, 20.0, 3000, 0.12, 0.05, 0.3,
                                                     0.02, 0.0)
    assert lora["loop_share_delta"] == -0.01 and math.isnan(full["loop_share_delta"])

    run = mlflow.get_run(comparison.run_id)
    assert run.data.tags["whisper_exp.entry_point"] == "compare"
    assert run.data.params["compared_runs"] == f"{ids['full']},{ids['lora']}"
    files = {a.path for a in mlflow.artifacts.list_artifacts(run_id=comparison.run_id,
                                                             artifact_path="comparison")}
    assert files == {"comparison/strategies.json", "comparison/strategies.csv",
                     "comparison/strategies.txt", "comparison/wer_vs_cost.png"}
    again = compare_runs(experiment="strategies", log=False)
    assert [r["run_id"] for r in again.rows] == [ids["full"], ids["lora"]], \
        "the comparison run itself is not a strategy"


def test_explicit_run_ids_and_printed_table():
    ids = _make_runs("chosen")
    rows = compare_runs([ids["lora"]], log=False).rows
    assert [r["strategy"] for r in rows] == ["lora r=32"]
    text = format_table(rows)
    header, line = text.splitlines()
    assert header.split()[:4] == ["run_id", "strategy", "trainable_params", "train_time_s"]
    assert line.startswith(ids["lora"][:8]) and "lora r=32" in line and "0.12" in line


def test_nothing_to_compare_names_the_problem():
    with pytest.raises(CompareError, match="experiment 'nope' not found"):
        compare_runs(experiment="nope")
    with pytest.raises(CompareError, match="run 'deadbeef' not found"):
        compare_runs(["deadbeef"])
    mlflow.set_experiment("empty")
    with pytest.raises(CompareError, match="no runs to compare"):
        compare_runs(experiment="empty")


def test_strategy_labels():
    assert strategy_label({"finetuning.strategy": "full",
                           "finetuning.freeze_encoder": "True"}) == "full freeze_encoder"
    assert strategy_label({"finetuning.strategy": "qlora", "finetuning.lora.r": "8",
                           "finetuning.freeze_encoder_layers": "None"}) == "qlora r=8"


def test_cli_prints_the_table_and_names_a_missing_experiment():
    from click.testing import CliRunner

    from whisper_exp.cli import main

    _make_runs("cli-compare")
    result = CliRunner().invoke(main, ["compare", "--experiment", "cli-compare", "--no-log"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["run_id", "strategy"]
    assert "full" in lines[1] and "lora" in lines[2], "best WER first"
    missing = CliRunner().invoke(main, ["compare", "--experiment", "no-such-experiment"])
    assert missing.exit_code == 2 and "no-such-experiment" in missing.output
