"""Optuna hyperparameter search over an experiment config, tracked in MLflow.

One MLflow parent run per study and one nested run per trial (a normal ``train`` run plus the
trial's number and final state). The study itself lives in Optuna's storage (``sqlite:///optuna.db``
by default), which is what makes a study resumable (same ``study_name``) and shareable: any number
of worker processes pointed at one RDB URL draw trial numbers from the same table.

The MLflow side is logged here with :mod:`whisper_exp.tracking` rather than optuna-integration's
``MLflowCallback``: that callback is deprecated in optuna-integration 5 and opens runs of its own,
while ``train`` already owns each trial's run.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import math
import os
import socket
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mlflow
import optuna
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from transformers import TrainerCallback

from whisper_exp import tracking
from whisper_exp.config import ConfigError, ExperimentConfig, load_config
from whisper_exp.training import train

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SPACE = PROJECT_ROOT / "experiments" / "search" / "lora.yaml"
DEFAULT_STORAGE = "sqlite:///optuna.db"
DEFAULT_N_TRIALS = 20
LORA_RANK = "finetuning.lora.r"
LEARNING_RATE = "training.learning_rate"
# What pruning watches (logged by the Trainer at each evaluation) and what a trial returns.
PRUNING_METRIC = "eval_wer"
OBJECTIVE_METRIC = "wer"

# Optuna study/trial user attributes that link the study to MLflow.
PARENT_RUN_ATTR = "mlflow_parent_run_id"
RUN_ID_ATTR = "mlflow_run_id"
FINGERPRINT_ATTR = "whisper_exp_config_fingerprint"
# How long a worker that joins a brand-new study waits for its creator to open the parent run.
PARENT_WAIT_S = 30.0
# States that count towards ``n_trials`` (the study's total, shared by workers and sessions).
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none", "threshold:<value>")


def worker_id() -> str:
    """Which process ran a trial (several workers, possibly on several machines, share a study)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class SearchSpaceError(ConfigError):
    """A search-space file is malformed or names a value the experiment config rejects."""


class TuningError(RuntimeError):
    """The study cannot start or finish as asked (e.g. model registration is unavailable)."""


# --------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class ParamSpec:
    """One searched config key and its distribution."""

    key: str
    kind: Literal["categorical", "float", "int"]
    choices: tuple[Any, ...] = ()
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"categorical {list(self.choices)}"
        extra = " log" if self.log else (f" step {self.step}" if self.step else "")
        return f"{self.kind} [{self.low}, {self.high}]{extra}"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind}
        if self.kind == "categorical":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high, log=self.log)
            if self.step is not None:
                out["step"] = self.step
        return out


@dataclass(frozen=True)
class SearchSpace:
    """The validated ``params`` of a search-space file."""

    params: tuple[ParamSpec, ...]
    source: str

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return {p.key: p.suggest(trial) for p in self.params}

    def as_dict(self) -> dict[str, Any]:
        return {"params": {p.key: p.as_dict() for p in self.params}}

    def encode(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Config-style values (lists for target_modules) -> the values Optuna stores."""
        unknown = set(values) - set(self.keys)
        if unknown:
            raise SearchSpaceError(f"{sorted(unknown)} are not searched in {self.source}")
        return {key: _encode_choice(value, key) for key, value in values.items()}


def _encode_choice(value: Any, where: str) -> Any:
    """Optuna stores only None/bool/int/float/str, so a list choice becomes ``"a,b"`` (which the
    config reads back as a list)."""
    if isinstance(value, list | tuple):
        if not value or not all(isinstance(v, str) and v and "," not in v for v in value):
            raise SearchSpaceError(
                f"{where}: a list choice must be non-empty names without commas, got {value!r}")
        return ",".join(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise SearchSpaceError(f"{where}: choice {value!r} must be a scalar or a list of names")


def apply_params(base_cfg: ExperimentConfig, values: Mapping[str, Any]) -> ExperimentConfig:
    """The base config with dotted keys replaced, re-validated like a ``--set`` override."""
    tree = base_cfg.to_dict()
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return load_config(None, tree)


_FIELDS = {
    "categorical": {"type", "choices"},
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
}


def _is_number(value: Any, integer: bool = False) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, int | float)


def _leaf_type(cfg: ExperimentConfig, key: str) -> Any:
    """The annotated type of a dotted config key, with ``| None`` stripped."""
    owner: Any = type(cfg)
    *parents, leaf = key.split(".")
    for part in parents:
        owner = typing.get_type_hints(owner)[part]
    hint = typing.get_type_hints(owner)[leaf]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return hint


def _parse_param(key: Any, spec: Any, base_cfg: ExperimentConfig, flat: dict[str, Any],
                 source: str) -> ParamSpec:
    where = f"{source}: params.{key}"
    if not isinstance(key, str) or key not in flat:
        close = difflib.get_close_matches(str(key), list(flat), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SearchSpaceError(f"{where}: not a config key{hint}")
    if not isinstance(spec, dict):
        raise SearchSpaceError(f"{where}: expected a mapping like {{type: float, low: .., "
                               f"high: ..}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in _FIELDS:
        raise SearchSpaceError(f"{where}: type {kind!r} is not one of {sorted(_FIELDS)}")
    unknown = set(spec) - _FIELDS[kind]
    if unknown:
        raise SearchSpaceError(f"{where}: unknown field(s) {sorted(unknown)} for type {kind}; "
                               f"allowed: {sorted(_FIELDS[kind])}")
    leaf_type = _leaf_type(base_cfg, key)

    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SearchSpaceError(f"{where}: choices must be a non-empty list")
        encoded = tuple(_encode_choice(c, where) for c in choices)
        if len(set(map(repr, encoded))) != len(encoded):
            raise SearchSpaceError(f"{where}: choices contain duplicates: {choices}")
        param = ParamSpec(key, "categorical", choices=encoded)
        probes = list(encoded)
    else:
        integer = kind == "int"
        low, high = spec.get("low"), spec.get("high")
        log_scale, step = spec.get("log", False), spec.get("step")
        if not (_is_number(low, integer) and _is_number(high, integer)):
            raise SearchSpaceError(f"{where}: low and high must both be "
                                   f"{'integers' if integer else 'numbers'}, got {low!r}, {high!r}")
        if not low < high:
            raise SearchSpaceError(f"{where}: low ({low}) must be below high ({high})")
        if not isinstance(log_scale, bool):
            raise SearchSpaceError(f"{where}: log must be true or false, got {log_scale!r}")
        if log_scale and low <= 0:
            raise SearchSpaceError(f"{where}: a log scale needs low > 0, got {low}")
        if step is not None:
            if not _is_number(step, integer) or step <= 0:
                raise SearchSpaceError(f"{where}: step must be a positive "
                                       f"{'integer' if integer else 'number'}, got {step!r}")
            if log_scale:
                raise SearchSpaceError(f"{where}: step and log cannot be combined")
        if leaf_type is int and not integer:
            raise SearchSpaceError(f"{where}: {key} is an integer setting; use type: int "
                                   f"(or categorical)")
        if leaf_type not in (int, float):
            raise SearchSpaceError(f"{where}: {key} is not a numeric setting; use type: "
                                   f"categorical")
        param = ParamSpec(key, kind, low=low, high=high, log=log_scale, step=step)
        probes = [low, high]

    for value in probes:
        try:
            apply_params(base_cfg, {key: value})
        except ConfigError as exc:
            raise SearchSpaceError(f"{where}: value {value!r} is rejected by the config: {exc}"
                                   ) from None
    return param


def load_search_space(path: str | Path, base_cfg: ExperimentConfig) -> SearchSpace:
    """Read and check a search-space YAML against ``base_cfg``; every problem names its entry."""
    path = Path(path)
    if not path.is_file():
        raise SearchSpaceError(f"search space {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SearchSpaceError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(loaded, dict) or set(loaded) != {"params"}:
        found = sorted(loaded) if isinstance(loaded, dict) else type(loaded).__name__
        raise SearchSpaceError(f"{path}: expected a single top-level key 'params', got {found}")
    params = loaded["params"]
    if not isinstance(params, dict) or not params:
        raise SearchSpaceError(f"{path}: params must map at least one config key to a "
                               f"distribution")
    flat = base_cfg.flat()
    specs = tuple(_parse_param(key, spec, base_cfg, flat, str(path))
                  for key, spec in params.items())
    return SearchSpace(specs, str(path))


# --------------------------------------------------------------------------- optuna pieces


class PruningCallback(TrainerCallback):
    """Reports dev WER at every evaluation and stops a trial the pruner judges hopeless.

    Raising ``optuna.TrialPruned`` inside the Trainer ends training at once; ``tracking.run``
    then ends the trial's MLflow run KILLED with ``optuna.trial_state=PRUNED``.
    """

    def __init__(self, trial: optuna.Trial, metric: str = PRUNING_METRIC):
        self.trial = trial
        self.metric = metric

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None:
            log.warning("trial %d: no %s in evaluation metrics; not reported for pruning",
                        self.trial.number, self.metric)
            return
        self.trial.report(float(value), step=state.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned at step {state.global_step}: {self.metric}={float(value):.4f}")


def make_sampler(name: str, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """TPE guides after 5 random trials (Optuna's default of 10 leaves a 12-trial search almost
    all random); ``constant_liar`` keeps parallel workers from sampling the same point."""
    if name == "tpe":
        return optuna.samplers.TPESampler(n_startup_trials=5, constant_liar=True, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"sampler {name!r} is not one of {list(SAMPLERS)}")


def make_pruner(name: str, direction: str = "minimize") -> optuna.pruners.BasePruner:
    """``median``: stop a trial whose WER at an evaluation is worse than the median of earlier
    trials at that step (after 3 finished trials); ``hyperband``; ``none``;
    ``threshold:0.8``: stop any trial whose WER passes 0.8 (a floor when maximising)."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    if name.startswith("threshold:"):
        try:
            bound = float(name.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"pruner {name!r}: expected threshold:<number>") from None
        if direction == "minimize":
            return optuna.pruners.ThresholdPruner(upper=bound)
        return optuna.pruners.ThresholdPruner(lower=bound)
    raise ConfigError(f"pruner {name!r} is not one of {list(PRUNERS)}")


def redact_storage(url: str) -> str:
    """The storage URL without its password, fit for logs and MLflow tags."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: nothing to hide we could parse
        return url


def _stale_trial_handler(retry: Callable[[optuna.Study, FrozenTrial], None]
                         ) -> Callable[[optuna.Study, FrozenTrial], None]:
    """When a worker dies mid-trial (killed, machine lost), the next worker to start a trial finds
    it stale by its heartbeat: end its MLflow run FAILED and queue its parameters once more."""

    def handle(study: optuna.Study, trial: FrozenTrial) -> None:
        client = MlflowClient()
        for run in _find_trial_runs(client, study.study_name, trial.number):
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, "optuna.trial_state", "FAIL")
                client.set_tag(run.info.run_id, "optuna.fail_reason",
                               "worker stopped sending heartbeats")
                client.set_terminated(run.info.run_id, "FAILED")
        retry(study, trial)

    return handle


def open_storage(url: str, heartbeat_interval: int | None = 60) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats (stale trials of dead workers are failed and retried once)
    and, for SQLite, a long lock timeout so concurrent workers wait instead of erroring."""
    engine_kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    )
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
        heartbeat = {"heartbeat_interval": heartbeat_interval,
                     "grace_period": 3 * heartbeat_interval,
                     "heartbeat_stale_trial_callback": _stale_trial_handler(retry)}
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    failures = 0
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except (OperationalError, IntegrityError, ProgrammingError) as exc:
            # Workers started together on a fresh database race to create its tables
            # (PostgreSQL: "type studydirection already exists" is a ProgrammingError), or the
            # server is briefly unreachable: wait and retry a few times.
            failures += 1
            if failures >= 5:
                raise TuningError(f"cannot open Optuna storage {redact_storage(url)}: {exc}"
                                  ) from exc
            time.sleep(0.5 * failures)
        except Exception as exc:  # noqa: BLE001 - bad URL, missing driver: say which storage
            raise TuningError(f"cannot open Optuna storage {redact_storage(url)}: {exc}"
                              ) from exc


def config_fingerprint(base_cfg: ExperimentConfig, space: SearchSpace) -> str:
    """Hash of what defines a study's trials (config minus tracking/output paths, plus space)."""
    tree = base_cfg.to_dict()
    tree.pop("tracking", None)
    tree.get("training", {}).pop("output_dir", None)
    blob = json.dumps({"config": tree, "space": space.as_dict()}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def default_study_name(base_cfg: ExperimentConfig, space: SearchSpace) -> str:
    """``<space>-<fingerprint>``: re-running the same command resumes its study, while a changed
    model, data or space starts a new one instead of mixing incomparable trials."""
    return f"{Path(space.source).stem}-{config_fingerprint(base_cfg, space)}"


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


def _summaries(study: optuna.Study) -> list[TrialSummary]:
    out = []
    for trial in study.get_trials(deepcopy=False):
        duration = trial.duration.total_seconds() if trial.duration else None
        out.append(TrialSummary(trial.number, trial.state.name, trial.value, dict(trial.params),
                                trial.user_attrs.get(RUN_ID_ATTR), duration))
    return out


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


# --------------------------------------------------------------------------- MLflow side


def _find_trial_runs(client: MlflowClient, study_name: str, number: int,
                     parent_run_id: str | None = None,
                     experiment_ids: Sequence[str] | None = None) -> list[Any]:
    """The MLflow run(s) of one trial, found by the tags every trial run carries."""
    clauses = [f"tags.`optuna.study_name` = '{study_name}'",
               f"tags.`optuna.trial_number` = '{number}'"]
    if parent_run_id:
        clauses.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    experiments = list(experiment_ids or [e.experiment_id for e in client.search_experiments()])
    return client.search_runs(experiments, filter_string=" and ".join(clauses))


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
        runs = _find_trial_runs(self.client, self.study_name, trial.number, self.parent_run_id,
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


class _TrialRecorder:
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
        best = _best_trial(study)
        if best is not None:
            self.client.log_metric(self.parent_run_id, "best_value", best.value,
                                   step=trial.number)
            self.client.set_tag(self.parent_run_id, "best_trial_number", str(best.number))
            if best.user_attrs.get(RUN_ID_ATTR):
                self.client.set_tag(self.parent_run_id, "best_run_id",
                                    best.user_attrs[RUN_ID_ATTR])


def _current_experiment_id(base_cfg: ExperimentConfig) -> str | None:
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = base_cfg.tracking.experiment_name
    experiment = mlflow.get_experiment_by_name(name) if name else None
    return experiment.experiment_id if experiment else None


def _parent_to_resume(study: optuna.Study, created: bool, client: MlflowClient,
                      experiment_id: str | None) -> tuple[str | None, bool]:
    """(parent run id to reopen or None, whether the study's recorded parent is usable).

    The worker that created the study opens the parent run; one joining a study that is brand
    new (no trials yet) waits briefly for it, so concurrent workers share one parent.
    """
    if created:
        return None, False
    deadline = time.monotonic() + (0 if study.get_trials(deepcopy=False) else PARENT_WAIT_S)
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
def _without_env(name: str) -> Iterator[None]:
    """Hide an environment variable for a while: under ``mlflow run``, ``MLFLOW_RUN_ID`` would
    make every ``start_run(nested=True)`` reopen the launcher's run instead of a trial run."""
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def _log_params_once(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
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


def _summarise(client: MlflowClient, parent_run_id: str, study: optuna.Study,
               space: SearchSpace, base_cfg: ExperimentConfig) -> None:
    """Whole-study summary on the parent run: best value/params/run, counts, table and plots.

    Best params are tags (``best.<key>``) and ``best_params.json`` rather than MLflow params,
    because params are immutable and the best changes as a study is resumed.
    """
    summaries = _summaries(study)
    rows = [{"number": t.number, "state": t.state, "value": t.value,
             "duration_s": t.duration_s, "run_id": t.run_id, **t.params} for t in summaries]
    tracking.log_csv(rows, "trials.csv",  # the parent is the active run here
                     fieldnames=["number", "state", "value", "duration_s", "run_id", *space.keys])
    counts = {f"n_trials_{state.name.lower()}": sum(t.state == state.name for t in summaries)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    for key, value in counts.items():
        client.log_metric(parent_run_id, key, value)
    best = _best_trial(study)
    if best is not None:
        client.log_metric(parent_run_id, "best_value", best.value,
                          step=max(t.number for t in summaries))
        client.set_tag(parent_run_id, "best_trial_number", str(best.number))
        if best.user_attrs.get(RUN_ID_ATTR):
            client.set_tag(parent_run_id, "best_run_id", best.user_attrs[RUN_ID_ATTR])
        for key, value in best.params.items():
            client.set_tag(parent_run_id, f"best.{key}", str(value))
        client.log_text(parent_run_id, json.dumps(
            {"trial": best.number, "value": best.value, "params": best.params,
             "run_id": best.user_attrs.get(RUN_ID_ATTR)}, indent=2), "best_params.json")
        client.log_text(parent_run_id, apply_params(base_cfg, best.params).to_yaml(),
                        "best_config.yaml")
    _log_plots(client, parent_run_id, study, space)


# --------------------------------------------------------------------------- entry point


def _load_or_create_study(name: str, storage: optuna.storages.BaseStorage, direction: str,
                          sampler: optuna.samplers.BaseSampler,
                          pruner: optuna.pruners.BasePruner) -> tuple[optuna.Study, bool]:
    """(study, created here): creation is atomic in the storage, so exactly one of several
    workers starting together learns it created the study."""
    try:
        return optuna.create_study(storage=storage, study_name=name, direction=direction,
                                   sampler=sampler, pruner=pruner), True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler,
                                  pruner=pruner)
    existing = study.direction.name.lower()
    if existing != direction:
        raise TuningError(f"study {name!r} exists with direction {existing}; asked {direction}")
    return study, False


def _open_study(name: str, storage: optuna.storages.RDBStorage, direction: str,
                sampler: str | optuna.samplers.BaseSampler, seed: int | None,
                pruner: optuna.pruners.BasePruner, fingerprint: str,
                queued: Sequence[Mapping[str, Any]]) -> tuple[optuna.Study, bool]:
    """Create, resume or join the study in its storage: (study, created by this process)."""
    study, created = _load_or_create_study(name, storage, direction, make_sampler("random"),
                                           pruner)
    if isinstance(sampler, str):
        # Offset the seed by the trials already in the study: a resumed session must not replay
        # the suggestions of the first one (a fresh study stays reproducible from ``seed``).
        offset = len(study.get_trials(deepcopy=False))
        study.sampler = make_sampler(sampler, None if seed is None else seed + offset)
    else:
        study.sampler = sampler
    previous = study.user_attrs.get(FINGERPRINT_ATTR)
    if previous and previous != fingerprint:
        log.warning("study %r was started with a different config or space (%s, now %s): its "
                    "trials may not be comparable", name, previous, fingerprint)
    if not previous:
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
    for params in queued:
        study.enqueue_trial(params, skip_if_exists=True)
    if storage.get_heartbeat_interval():  # fail and requeue dead workers' trials first
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    return study, created


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
) -> StudyResult:
    """Run (or resume, or join) an Optuna study that fine-tunes ``base_cfg`` per trial.

    ``n_trials`` is the study's total across sessions and workers (finished or running trials;
    concurrent workers may overshoot by one each), ``timeout`` this session's budget in seconds.
    Trials that raise are recorded FAIL and the study goes on; Ctrl-C stops after recording the
    interrupted trial FAIL and returns with ``interrupted=True``. ``enqueue`` queues given
    parameter sets first (skipped if already tried). ``register_best`` registers the best
    trial's model under that name with ``register_alias``.
    """
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"direction {direction!r} is not minimize or maximize")
    space = load_search_space(space_path, base_cfg)
    queued = [space.encode(params) for params in enqueue]
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
    study, created = _open_study(name, study_storage, direction, sampler, seed, study_pruner,
                                 fingerprint, queued)
    client = MlflowClient()
    experiment_id = _current_experiment_id(base_cfg)
    resume_id, recorded_usable = _parent_to_resume(study, created, client, experiment_id)
    shown_storage = redact_storage(storage)
    parent_tags = {"whisper_exp.entry_point": "tune", "optuna.study_name": name,
                   "optuna.storage": shown_storage, "optuna.role": "study",
                   "optuna.sampler": str(sampler), "optuna.pruner": str(pruner),
                   "optuna.n_trials": str(n_trials), "optuna.timeout": str(timeout)}
    interrupted = False
    parent_id = ""
    try:
        with tracking.run(run_name=base_cfg.tracking.run_name or f"tune-{name}",
                          tags=parent_tags, run_id=resume_id) as parent:
            parent_id = parent.info.run_id
            if not recorded_usable:
                study.set_user_attr(PARENT_RUN_ATTR, parent_id)
            _log_params_once(client, parent_id, {
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
                _TrialRecorder(parent_id)]
            if n_trials is not None:
                callbacks.append(optuna.study.MaxTrialsCallback(n_trials, states=COUNTED_STATES))
            objective = _Objective(base_cfg, space, name, parent_id, parent.info.experiment_id)
            try:
                if remaining != 0:
                    with _without_env("MLFLOW_RUN_ID"):
                        study.optimize(objective, n_trials=remaining, timeout=timeout,
                                       catch=(Exception,), callbacks=callbacks,
                                       gc_after_trial=True)
            finally:  # Ctrl-C included: what finished is summarised before the run ends KILLED
                try:
                    _summarise(client, parent_id, study, space, base_cfg)
                except Exception as exc:  # noqa: BLE001 - never mask the study's own outcome
                    log.warning("could not summarise the study on run %s: %s", parent_id, exc)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: finished trials are kept in %s; re-run with study_name=%r to "
                    "continue", shown_storage, name)

    best = _best_trial(study)
    result = StudyResult(
        study_name=name, storage=shown_storage, parent_run_id=parent_id, direction=direction,
        trials=_summaries(study), interrupted=interrupted,
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

