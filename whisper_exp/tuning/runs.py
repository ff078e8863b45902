"""The MLflow side of a study: the parent run, trial runs, running best, summary and plots.

The MLflow side is logged here with :mod:`whisper_exp.tracking` rather than optuna-integration's
``MLflowCallback``: that callback is deprecated in optuna-integration 5 and opens runs of its own,
while ``train`` already owns each trial's run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlflow
import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from whisper_exp import tracking
from whisper_exp.config import ExperimentConfig
from whisper_exp.tuning.space import SearchSpace, apply_params

log = logging.getLogger(__name__)

LORA_RANK = "finetuning.lora.r"
LEARNING_RATE = "training.learning_rate"

# Optuna study/trial user attributes that link the study to MLflow.
PARENT_RUN_ATTR = "mlflow_parent_run_id"
RUN_ID_ATTR = "mlflow_run_id"
# How long a worker that joins a brand-new study waits for its creator to open the parent run.
PARENT_WAIT_S = 30.0


# --------------------------------------------------------------------------- results


@dataclass
class TrialSummary:
    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    run_id: str | None
    duration_s: float | None


@dataclass
class StudyResult:
    study_name: str
    storage: str
    parent_run_id: str
    direction: str
    trials: list[TrialSummary] = field(default_factory=list)
    best_trial_number: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_run_id: str | None = None
    interrupted: bool = False
    registered: Any = None

    def count(self, state: str) -> int:
        return sum(t.state == state for t in self.trials)


def trial_summaries(study: optuna.Study) -> list[TrialSummary]:
    out = []
    for trial in study.get_trials(deepcopy=False):
        duration = trial.duration.total_seconds() if trial.duration else None
        out.append(TrialSummary(trial.number, trial.state.name, trial.value, dict(trial.params),
                                trial.user_attrs.get(RUN_ID_ATTR), duration))
    return out


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


# --------------------------------------------------------------------------- MLflow side


def set_parent_tag(client: MlflowClient, run_id: str, key: str, value: str,
                   attempts: int = 3) -> None:
    """``set_tag`` on the run every worker writes to, tolerating a concurrent first write.

    MLflow's SQL store sets a tag by looking it up and inserting it when absent; two workers
    that finish trials at the same moment can both insert ``best_trial_number`` and one gets a
    UNIQUE-constraint error. Once the other's row exists, the retry updates it.
    """
    for attempt in range(1, attempts + 1):
        try:
            client.set_tag(run_id, key, value)
            return
        except MlflowException:
            if attempt == attempts:
                raise
            log.info("tag %s on the parent run raced another worker; retrying", key)
            time.sleep(0.2 * attempt)


def find_trial_runs(client: MlflowClient, study_name: str, number: int,
                     parent_run_id: str | None = None,
                     experiment_ids: Sequence[str] | None = None) -> list[Any]:
    """The MLflow run(s) of one trial, found by the tags every trial run carries."""
    clauses = [f"tags.`optuna.study_name` = '{study_name}'",
               f"tags.`optuna.trial_number` = '{number}'"]
    if parent_run_id:
        clauses.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    experiments = list(experiment_ids or [e.experiment_id for e in client.search_experiments()])
    return client.search_runs(experiments, filter_string=" and ".join(clauses))


class TrialRecorder:
    """After each trial: its final Optuna state on its run, and the running best on the parent."""

    def __init__(self, parent_run_id: str):
        self.parent_run_id = parent_run_id
        self.client = MlflowClient()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            self.client.set_tag(run_id, "optuna.trial_state", trial.state.name)
        if trial.state == TrialState.COMPLETE and math.isfinite(trial.value):
            self.client.log_metric(self.parent_run_id, "trial_value", trial.value,
                                   step=trial.number)
        best = best_trial(study)
        if best is not None:
            self.client.log_metric(self.parent_run_id, "best_value", best.value,
                                   step=trial.number)
            set_parent_tag(self.client, self.parent_run_id, "best_trial_number",
                           str(best.number))
            if best.user_attrs.get(RUN_ID_ATTR):
                set_parent_tag(self.client, self.parent_run_id, "best_run_id",
                               best.user_attrs[RUN_ID_ATTR])


def current_experiment_id(base_cfg: ExperimentConfig) -> str | None:
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = base_cfg.tracking.experiment_name
    experiment = mlflow.get_experiment_by_name(name) if name else None
    return experiment.experiment_id if experiment else None


def parent_to_resume(study: optuna.Study, created: bool, client: MlflowClient,
                      experiment_id: str | None) -> tuple[str | None, bool]:
    """(parent run id to reopen or None, whether the study's recorded parent is usable).

    The worker that created the study opens the parent run; one joining a study that is brand
    new (no trials yet) waits briefly for it, so concurrent workers share one parent.
    """
    if created:
        return None, False
    # Queued trials (enqueue, the warm start) exist before any worker ran: not a sign of age.
    started = study.get_trials(deepcopy=False, states=tuple(s for s in TrialState
                                                            if s != TrialState.WAITING))
    deadline = time.monotonic() + (0 if started else PARENT_WAIT_S)
    recorded = study.user_attrs.get(PARENT_RUN_ATTR)
    while recorded is None and time.monotonic() < deadline:
        time.sleep(0.5)
        recorded = study.user_attrs.get(PARENT_RUN_ATTR)
    if recorded is None:
        return None, False
    try:
        run = client.get_run(recorded)
    except MlflowException:
        return None, False
    usable = (run.info.lifecycle_stage == "active"
              and (experiment_id is None or run.info.experiment_id == experiment_id))
    if not usable:
        log.warning("study's parent run %s is deleted or in another experiment; opening a new "
                    "one", recorded)
        return None, False
    # Under `mlflow run` the launcher's run is this session's parent; it cannot reopen another.
    return (None if os.environ.get("MLFLOW_RUN_ID") else recorded), True


@contextlib.contextmanager
def without_env(name: str) -> Iterator[None]:
    """Hide an environment variable for a while: under ``mlflow run``, ``MLFLOW_RUN_ID`` would
    make every ``start_run(nested=True)`` reopen the launcher's run instead of a trial run."""
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def log_params_once(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """MLflow params are immutable: on a resumed parent, log only new keys and warn on changes."""
    existing = client.get_run(run_id).data.params
    new = {k: "" if v is None else str(v) for k, v in params.items() if k not in existing}
    for key, value in params.items():
        if key in existing and existing[key] != str(value):
            log.warning("parent run keeps %s=%s (this session uses %s)", key, existing[key], value)
    if new:
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in new.items()])


@contextlib.contextmanager
def _quiet_plot_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _log_plots(client: MlflowClient, run_id: str, study: optuna.Study, space: SearchSpace
               ) -> list[str]:
    """Optuna's matplotlib plots as PNG artifacts under ``plots/``; returns the files logged."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    trials = study.get_trials(deepcopy=False)
    n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
    plots: list[tuple[str, Callable[[], Any]]] = []
    if n_complete >= 1:
        plots.append(("optimization_history",
                      lambda: optuna_plots.plot_optimization_history(study)))
    if n_complete >= 2:
        plots.append(("param_importances", lambda: optuna_plots.plot_param_importances(study)))
        pair = ([LORA_RANK, LEARNING_RATE] if {LORA_RANK, LEARNING_RATE} <= set(space.keys)
                else space.keys[:2])
        if len(pair) == 2:
            plots.append(("contour", lambda: optuna_plots.plot_contour(study, params=pair)))
    if any(t.intermediate_values for t in trials):
        plots.append(("intermediate_values",
                      lambda: optuna_plots.plot_intermediate_values(study)))
    logged = []
    for name, draw in plots:
        try:
            with _quiet_plot_warnings():
                axes = draw()
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            figure = first.figure
            figure.set_size_inches(8, 5.5)
            figure.tight_layout()
            client.log_figure(run_id, figure, f"plots/{name}.png")
            plt.close(figure)
            logged.append(f"plots/{name}.png")
        except Exception as exc:  # noqa: BLE001 - a plot must never cost the study its summary
            log.warning("could not draw the %s plot: %s", name, exc)
    return logged


def summarise_study(client: MlflowClient, parent_run_id: str, study: optuna.Study,
               space: SearchSpace, base_cfg: ExperimentConfig) -> None:
    """Whole-study summary on the parent run: best value/params/run, counts, table and plots.

    Best params are tags (``best.<key>``) and ``best_params.json`` rather than MLflow params,
    because params are immutable and the best changes as a study is resumed.
    """
    summaries = trial_summaries(study)
    rows = [{"number": t.number, "state": t.state, "value": t.value,
             "duration_s": t.duration_s, "run_id": t.run_id, **t.params} for t in summaries]
    tracking.log_csv(rows, "trials.csv",  # the parent is the active run here
                     fieldnames=["number", "state", "value", "duration_s", "run_id", *space.keys])
    counts = {f"n_trials_{state.name.lower()}": sum(t.state == state.name for t in summaries)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    for key, value in counts.items():
        client.log_metric(parent_run_id, key, value)
    best = best_trial(study)
    if best is not None:
        client.log_metric(parent_run_id, "best_value", best.value,
                          step=max(t.number for t in summaries))
        set_parent_tag(client, parent_run_id, "best_trial_number", str(best.number))
        if best.user_attrs.get(RUN_ID_ATTR):
            set_parent_tag(client, parent_run_id, "best_run_id", best.user_attrs[RUN_ID_ATTR])
        for key, value in best.params.items():
            set_parent_tag(client, parent_run_id, f"best.{key}", str(value))
        client.log_text(parent_run_id, json.dumps(
            {"trial": best.number, "value": best.value, "params": best.params,
             "run_id": best.user_attrs.get(RUN_ID_ATTR)}, indent=2), "best_params.json")
        client.log_text(parent_run_id, apply_params(base_cfg, best.params).to_yaml(),
                        "best_config.yaml")
    _log_plots(client, parent_run_id, study, space)


