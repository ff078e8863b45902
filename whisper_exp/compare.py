"""Strategies side by side: one table of cost and quality over finished ``train`` runs (or
chosen run ids), printed and logged to a comparison run with a WER-vs-cost plot
(``whisper-exp compare``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from whisper_exp import tracking

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ENTRY_POINT_TAG = "whisper_exp.entry_point"
# Column -> the run metric it shows (the report's names; see README "metric names").
METRIC_COLUMNS = {
    "trainable_params": "trainable_params",
    "train_time_s": "train_runtime_s",
    "samples_per_s": "train_samples_per_second",
    "peak_memory_mb": "peak_memory_mb",
    "wer": "wer",
    "cer": "cer",
    "wer_orthographic": "wer_orthographic",
    "ins_rate": "ins_rate",
    "loop_share": "loop_share",
}
ARTIFACT_DIR = "comparison"


class CompareError(ValueError):
    """Nothing to compare: an unknown experiment or run id, or no finished train runs."""


@dataclass
class StrategyComparison:
    rows: list[dict[str, Any]]
    run_id: str | None  # the comparison run, None when not logged


def strategy_label(params: dict[str, str]) -> str:
    """``lora r=32``, ``full freeze_encoder``, ``full freeze_encoder_layers=2`` ... from the
    run's config params."""
    strategy = params.get("finetuning.strategy", "?")
    parts = [strategy]
    if strategy in ("lora", "qlora") and params.get("finetuning.lora.r"):
        parts.append(f"r={params['finetuning.lora.r']}")
    layers = params.get("finetuning.freeze_encoder_layers", "")
    if layers not in ("", "None"):
        parts.append(f"freeze_encoder_layers={layers}")
    elif params.get("finetuning.freeze_encoder") == "True":
        parts.append("freeze_encoder")
    return " ".join(parts)


def find_runs(run_ids: Sequence[str] = (), experiment: str | None = None,
              client: MlflowClient | None = None) -> list[Run]:
    """The given runs, or every finished ``train`` run (tune trials included) of
    ``experiment``."""
    client = client or MlflowClient()
    runs = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except mlflow.exceptions.MlflowException as exc:
            raise CompareError(f"run {run_id!r} not found: {exc.message}") from None
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise CompareError(f"experiment {experiment!r} not found")
        runs += client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{ENTRY_POINT_TAG}` = 'train' and attributes.status = "
                          "'FINISHED'", order_by=["attributes.start_time ASC"])
    if not runs:
        raise CompareError("no runs to compare: give run ids, or an experiment with finished "
                           "train runs")
    return runs


def strategy_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run, best WER first: strategy, cost, quality and every ``*_delta`` metric
    a run logged (regressions against its base)."""
    deltas = sorted({k for run in runs for k in run.data.metrics if k.endswith("_delta")})
    rows = []
    for run in runs:
        metrics = run.data.metrics
        row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name,
                               "strategy": strategy_label(run.data.params)}
        for column, metric in METRIC_COLUMNS.items():
            row[column] = metrics.get(metric, math.nan)
        for name in deltas:
            row[name] = metrics.get(name, math.nan)
        rows.append(row)
    return sorted(rows, key=lambda r: (math.isnan(r["wer"]), r["wer"]))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table (the run id shortened to 8 characters)."""
    if not rows:
        return ""
    columns = [c for c in rows[0] if c != "run_name"]
    cells = [[_cell(row[c])[:8] if c == "run_id" else _cell(row[c]) for c in columns]
             for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def cost_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """WER against training time and against peak memory, one labelled point per run."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    for ax, cost, label in zip(figure.subplots(1, 2), ("train_time_s", "peak_memory_mb"),
                               ("training time (s)", "peak memory (MiB)"), strict=True):
        for row in rows:
            if math.isnan(row[cost]) or math.isnan(row["wer"]):
                continue
            ax.scatter(row[cost], 100 * row["wer"])
            ax.annotate(row["strategy"], (row[cost], 100 * row["wer"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("WER %")
        ax.set_title(f"WER vs {label}", fontsize=9)
    return figure


def compare_runs(run_ids: Sequence[str] = (), experiment: str | None = None, *,
                 log: bool = True, tracking_uri: str | None = None,
                 run_name: str = "compare") -> StrategyComparison:
    """Build the strategy table; with ``log``, record it (JSON table, CSV, plot, compared run
    ids) in a new run of ``experiment`` (else the active experiment)."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    rows = strategy_rows(find_runs(run_ids, experiment))
    if not log:
        return StrategyComparison(rows, None)
    if experiment:
        mlflow.set_experiment(experiment)
    import pandas as pd

    with tracking.run(run_name=run_name, tags={ENTRY_POINT_TAG: "compare"}) as active:
        mlflow.log_param("compared_runs", ",".join(r["run_id"] for r in rows)[:6000])
        mlflow.log_table(pd.DataFrame(rows), f"{ARTIFACT_DIR}/strategies.json")
        tracking.log_csv(rows, f"{ARTIFACT_DIR}/strategies.csv")
        mlflow.log_text(format_table(rows) + "\n", f"{ARTIFACT_DIR}/strategies.txt")
        mlflow.log_figure(cost_figure(rows), f"{ARTIFACT_DIR}/wer_vs_cost.png")
        return StrategyComparison(rows, active.info.run_id)
