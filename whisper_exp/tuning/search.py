"""``tune()``: one session of a study, from validating the space to registering the best model.

Each trial is a nested ``train`` run with the sampled keys applied to the base config; the
session opens (or rejoins) the study's parent run, runs trials until the study's ``n_trials`` or
this session's ``timeout``, and summarises the whole study on the parent run.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import mlflow
import optuna
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from whisper_exp import tracking
from whisper_exp.config import ConfigError, ExperimentConfig
from whisper_exp.training import train
from whisper_exp.tuning.runs import (
    PARENT_RUN_ATTR,
    RUN_ID_ATTR,
    StudyResult,
    TrialRecorder,
    best_trial,
    current_experiment_id,
    find_trial_runs,
    log_params_once,
    parent_to_resume,
    summarise_study,
    trial_summaries,
    without_env,
)
from whisper_exp.tuning.space import DEFAULT_SPACE, SearchSpace, apply_params, load_search_space
from whisper_exp.tuning.study import (
    DEFAULT_STORAGE,
    PRUNING_METRIC,
    PruningCallback,
    TuningError,
    config_fingerprint,
    default_study_name,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
    redact_storage,
)

log = logging.getLogger(__name__)

DEFAULT_N_TRIALS = 20
OBJECTIVE_METRIC = "wer"
# States that count towards ``n_trials`` (the study's total, shared by workers and sessions).
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


def worker_id() -> str:
    """Which process ran a trial (several workers, possibly on several machines, share a study)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Objective:
    """One trial = one nested ``train`` run with the sampled keys applied to the base config."""

    def __init__(self, base_cfg: ExperimentConfig, space: SearchSpace, study_name: str,
                 parent_run_id: str, experiment_id: str):
        self.base_cfg = base_cfg
        self.space = space
        self.study_name = study_name
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.client = MlflowClient()

    def __call__(self, trial: optuna.Trial) -> float:
        values = self.space.suggest(trial)
        tags = {"whisper_exp.entry_point": "tune", "optuna.study_name": self.study_name,
                "optuna.trial_number": str(trial.number), "optuna.trial_state": "RUNNING",
                "optuna.worker": worker_id()}
        log.info("trial %d: %s", trial.number, values)
        try:
            cfg = apply_params(self.base_cfg, values)
            cfg.tracking.run_name = f"{self.study_name}-trial-{trial.number}"
            # A trial whose worker died is re-run from the start (heartbeat retry), never
            # resumed, so Trainer checkpoints would only cost disk and time.
            cfg.training.checkpoint_steps = -1
            result = train(cfg, callbacks=[PruningCallback(trial)], nested=True, tags=tags)
        except optuna.TrialPruned:
            self._link_run(trial, values, tags, None)
            raise
        except BaseException as exc:  # also Ctrl-C: Optuna records that trial FAIL too
            reason = f"{type(exc).__name__}: {exc}"[:500]
            trial.set_user_attr("fail_reason", reason)
            run_id = self._link_run(trial, values, tags, reason)
            self.client.set_tag(run_id, "optuna.trial_state", "FAIL")
            self.client.set_tag(run_id, "optuna.fail_reason", reason)
            raise
        trial.set_user_attr(RUN_ID_ATTR, result.run_id)
        return float(result.final.scores.wer)

    def _link_run(self, trial: optuna.Trial, values: Mapping[str, Any], tags: Mapping[str, str],
                  failure: str | None) -> str:
        """Record the trial's MLflow run id on the trial; a trial that failed before ``train``
        opened a run gets a FAILED run of its own, so every trial shows up in MLflow."""
        runs = find_trial_runs(self.client, self.study_name, trial.number, self.parent_run_id,
                                [self.experiment_id])
        if runs:
            run_id = runs[0].info.run_id
        else:
            run = self.client.create_run(self.experiment_id, tags={
                **tags, "mlflow.parentRunId": self.parent_run_id,
                "mlflow.runName": f"{self.study_name}-trial-{trial.number}"})
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=[
                mlflow.entities.Param(k, str(v)) for k, v in values.items()])
            self.client.set_terminated(run_id, "FAILED" if failure else "KILLED")
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        return run_id



def _registry_function() -> Callable[..., Any]:
    """``whisper_exp.registry.register_run``, imported lazily (it is optional for tuning)."""
    try:
        from whisper_exp.registry import register_run
    except ImportError as exc:
        raise TuningError("register_best needs whisper_exp.registry.register_run, which this "
                          f"installation lacks ({exc})") from exc
    return register_run


def tune(
    base_cfg: ExperimentConfig,
    space_path: str | Path = DEFAULT_SPACE,
    *,
    n_trials: int | None = DEFAULT_N_TRIALS,
    timeout: float | None = None,
    study_name: str | None = None,
    storage: str = DEFAULT_STORAGE,
    direction: Literal["minimize", "maximize"] = "minimize",
    sampler: str | optuna.samplers.BaseSampler = "tpe",
    pruner: str | optuna.pruners.BasePruner = "median",
    register_best: str | None = None,
    register_alias: str | None = "challenger",
    seed: int | None = None,
    enqueue: Sequence[Mapping[str, Any]] = (),
    heartbeat_interval: int | None = 60,
    warm_start: bool = True,
) -> StudyResult:
    """Run (or resume, or join) an Optuna study that fine-tunes ``base_cfg`` per trial.

    ``n_trials`` is the study's total across sessions and workers (finished or running trials;
    concurrent workers may overshoot by one each), ``timeout`` this session's budget in seconds.
    Trials that raise are recorded FAIL and the study goes on; Ctrl-C stops after recording the
    interrupted trial FAIL and returns with ``interrupted=True``. ``enqueue`` queues given
    parameter sets first (skipped if already tried). ``warm_start``: a new study then also
    queues ``base_cfg``'s own values of the searched keys (when they lie inside the space), so
    the starting config is scored beside the search. ``register_best`` registers the best
    trial's model under that name with ``register_alias``.
    """
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"direction {direction!r} is not minimize or maximize")
    space = load_search_space(space_path, base_cfg)
    queued = [space.encode(params) for params in enqueue]
    base_values = space.config_values(base_cfg) if warm_start else None
    if warm_start and base_values is None:
        log.info("the base config's values of %s lie outside the space: not queued as a trial",
                 space.keys)
    if isinstance(sampler, str):
        make_sampler(sampler)  # an unknown name fails here, before the study exists
    study_pruner = make_pruner(pruner, direction) if isinstance(pruner, str) else pruner
    register_run = _registry_function() if register_best else None
    name = study_name or default_study_name(base_cfg, space)
    if "'" in name or '"' in name:
        raise ConfigError(f"study name {name!r} must not contain quotes")
    fingerprint = config_fingerprint(base_cfg, space)

    study_storage = open_storage(storage, heartbeat_interval)  # a bad URL fails before MLflow
    tracking.configure(base_cfg.tracking.tracking_uri, base_cfg.tracking.experiment_name)
    study, created = open_study(name, study_storage, direction, sampler, seed, study_pruner,
                                 fingerprint, queued, base_values)
    client = MlflowClient()
    experiment_id = current_experiment_id(base_cfg)
    resume_id, recorded_usable = parent_to_resume(study, created, client, experiment_id)
    shown_storage = redact_storage(storage)
    parent_tags = {"whisper_exp.entry_point": "tune", "optuna.study_name": name,
                   "optuna.storage": shown_storage, "optuna.role": "study",
                   "optuna.sampler": str(sampler), "optuna.pruner": str(pruner),
                   "optuna.n_trials": str(n_trials), "optuna.timeout": str(timeout)}
    interrupted = False
    parent_id = ""
    try:
        with tracking.run(run_name=base_cfg.tracking.run_name or f"tune-{name}",
                          tags=parent_tags, run_id=resume_id,
                          log_system_metrics=base_cfg.tracking.system_metrics) as parent:
            parent_id = parent.info.run_id
            if not recorded_usable:
                study.set_user_attr(PARENT_RUN_ATTR, parent_id)
            log_params_once(client, parent_id, {
                "study_name": name, "direction": direction, "objective": OBJECTIVE_METRIC,
                "pruning_metric": PRUNING_METRIC, "config_fingerprint": fingerprint,
                **{f"space.{p.key}": p.describe() for p in space.params}})
            mlflow.log_text(yaml.safe_dump(space.as_dict(), sort_keys=False), "search_space.yaml")
            mlflow.log_text(base_cfg.to_yaml(), "base_config.yaml")

            already = len(study.get_trials(deepcopy=False, states=COUNTED_STATES))
            remaining = None if n_trials is None else max(0, n_trials - already)
            log.info("study %r in %s: %d trial(s) so far, running %s more (parent run %s)",
                     name, shown_storage, already,
                     "unlimited" if remaining is None else remaining, parent_id)
            callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [
                TrialRecorder(parent_id)]
            if n_trials is not None:
                callbacks.append(optuna.study.MaxTrialsCallback(n_trials, states=COUNTED_STATES))
            objective = _Objective(base_cfg, space, name, parent_id, parent.info.experiment_id)
            try:
                if remaining != 0:
                    with without_env("MLFLOW_RUN_ID"):
                        study.optimize(objective, n_trials=remaining, timeout=timeout,
                                       catch=(Exception,), callbacks=callbacks,
                                       gc_after_trial=True)
            finally:  # Ctrl-C included: what finished is summarised before the run ends KILLED
                try:
                    summarise_study(client, parent_id, study, space, base_cfg)
                except Exception as exc:  # noqa: BLE001 - never mask the study's own outcome
                    log.warning("could not summarise the study on run %s: %s", parent_id, exc)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: finished trials are kept in %s; re-run with study_name=%r to "
                    "continue", shown_storage, name)

    best = best_trial(study)
    result = StudyResult(
        study_name=name, storage=shown_storage, parent_run_id=parent_id, direction=direction,
        trials=trial_summaries(study), interrupted=interrupted,
        best_trial_number=best.number if best else None,
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        best_run_id=best.user_attrs.get(RUN_ID_ATTR) if best else None,
    )
    if register_run is not None and not interrupted:
        if result.best_run_id is None:
            log.warning("no completed trial: nothing to register as %r", register_best)
        else:
            result.registered = register_run(result.best_run_id, name=register_best,
                                              alias=register_alias)
            version = getattr(result.registered, "version", result.registered)
            client.set_tag(parent_id, "registered_model", f"{register_best}/{version}")
    return result


def format_trials(result: StudyResult) -> str:
    """A plain-text table of a study's trials and its best configuration."""
    keys = sorted({k for t in result.trials for k in t.params})
    header = ["trial", "state", "value", "seconds", *keys]
    lines = [header]
    for t in result.trials:
        lines.append([str(t.number), t.state, "" if t.value is None else f"{t.value:.4f}",
                      "" if t.duration_s is None else f"{t.duration_s:.0f}",
                      *(_short(t.params.get(k)) for k in keys)])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     for row in lines)
    if result.best_trial_number is None:
        return text + "\nbest: none (no completed trial)"
    best = ", ".join(f"{k}={_short(v)}" for k, v in result.best_params.items())
    return (text + f"\nbest: trial {result.best_trial_number} value={result.best_value:.4f} "
            f"{best} run_id={result.best_run_id}")


def _short(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)

