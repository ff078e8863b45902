"""Where a study lives and how it samples: Optuna storage (heartbeats, stale trials), samplers,
pruners, and creating, resuming or joining a study under a name derived from its config."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial
from transformers import TrainerCallback

from whisper_exp.config import ConfigError, ExperimentConfig
from whisper_exp.tuning.runs import find_trial_runs
from whisper_exp.tuning.space import SearchSpace

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///optuna.db"
# The storage URL when --storage is not given: a URL holding a password belongs here (or the
# password in PGPASSWORD / ~/.pgpass), not in `-P storage=`, which `mlflow run` logs as a param.
STORAGE_ENV = "WHISPER_EXP_OPTUNA_STORAGE"
# What pruning watches (logged by the Trainer at each evaluation).
PRUNING_METRIC = "eval_wer"
# Optuna study attribute: what the study's trials were run on (config and space).
FINGERPRINT_ATTR = "whisper_exp_config_fingerprint"
# Optuna trial attribute of the trial that scores the base config itself.
WARM_START_ATTR = "base_config"

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none", "threshold:<value>")


class TuningError(RuntimeError):
    """The study cannot start or finish as asked (e.g. model registration is unavailable)."""


def _per_epoch(args) -> bool:
    strategy = getattr(args, "eval_strategy", "")
    return getattr(strategy, "value", strategy) == "epoch"


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
        if value is None and state.max_steps and state.global_step >= state.max_steps:
            return  # the last step's evaluation is loss-only; the objective is the final WER
        if value is None:
            log.warning("trial %d: no %s in evaluation metrics; not reported for pruning",
                        self.trial.number, self.metric)
            return
        step = self.resource(args, state)
        self.trial.report(float(value), step=step)
        if self.trial.should_prune():
            unit = "epoch" if _per_epoch(args) else "step"
            raise optuna.TrialPruned(f"pruned at {unit} {step}: {self.metric}={float(value):.4f}")

    @staticmethod
    def resource(args, state) -> int:
        """The budget spent so far, as the pruner counts it: epochs when evaluating each epoch
        (so Hyperband's rungs 1, 3, 9... are epochs, and trials of different sizes or batch sizes
        meet at the same rung), else optimizer steps."""
        return max(1, round(state.epoch)) if _per_epoch(args) else state.global_step


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
    trials at that step or epoch (after 3 finished trials); ``hyperband`` (rungs at 1, 3, 9...
    epochs, or steps when evaluating every ``eval_steps``); ``none``;
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


def storage_url(given: str | None = None) -> str:
    """The Optuna storage to use: the one given, else ``$WHISPER_EXP_OPTUNA_STORAGE``, else
    ``sqlite:///optuna.db`` in the working directory."""
    return given or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


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
        for run in find_trial_runs(client, study.study_name, trial.number):
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, "optuna.trial_state", "FAIL")
                client.set_tag(run.info.run_id, "optuna.fail_reason",
                               "worker stopped sending heartbeats")
                client.set_terminated(run.info.run_id, "FAILED")
        retry(study, trial)

    return handle


# How long a storage call waits for its database to come back (a PostgreSQL restart, a failover)
# before the worker gives up.
STORAGE_RECONNECT_S = 180.0


def _lost_connection(exc: BaseException) -> BaseException | None:
    """The dropped or refused database connection anywhere in the exception's chain (Optuna
    wraps commit failures in StorageInternalError), else None."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (OperationalError, InterfaceError)) or (
                isinstance(exc, DBAPIError) and exc.connection_invalidated):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _reconnecting(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        deadline = time.monotonic() + STORAGE_RECONNECT_S
        pause = 0.5
        while True:
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:
                cause = _lost_connection(exc)
                if cause is None or time.monotonic() > deadline:
                    raise
                reason = str(getattr(cause, "orig", None) or cause).strip().splitlines()[0]
                log.warning("Optuna storage %s: connection lost in %s (%s); retrying in %.1f s",
                            self.url_for_logs, method.__name__, reason[:160], pause)
                time.sleep(pause)
                pause = min(2 * pause, 5.0)

    return call


class ReconnectingRDBStorage(optuna.storages.RDBStorage):
    """An RDBStorage whose calls wait out a database restart instead of failing the trial (and
    the worker): a call that lost its connection is retried with a fresh one (pool_pre_ping
    drops dead pooled connections) for up to ``STORAGE_RECONNECT_S``. A connection refused or
    cut mid-transaction commits nothing (PostgreSQL rolls it back), so a retried write is
    written once; only a commit whose acknowledgement alone was lost could repeat."""

    url_for_logs = ""


for _name in ("create_new_study", "delete_study", "set_study_user_attr",
              "set_study_system_attr", "get_study_id_from_name", "get_study_name_from_id",
              "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
              "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies",
              "create_new_trial", "set_trial_param", "get_trial_param",
              "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
              "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial",
              "get_all_trials", "get_best_trial", "record_heartbeat",
              "_get_stale_trial_ids"):
    setattr(ReconnectingRDBStorage, _name,
            _reconnecting(getattr(optuna.storages.RDBStorage, _name)))


def open_storage(url: str, heartbeat_interval: int | None = 60) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats (stale trials of dead workers are failed and retried once),
    that waits out a database restart (ReconnectingRDBStorage), and, for SQLite, a long lock
    timeout so concurrent workers wait instead of erroring."""
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
                storage = ReconnectingRDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
            storage.url_for_logs = redact_storage(url)
            return storage
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


def open_study(name: str, storage: optuna.storages.RDBStorage, direction: str,
                sampler: str | optuna.samplers.BaseSampler, seed: int | None,
                pruner: optuna.pruners.BasePruner, fingerprint: str,
                queued: Sequence[Mapping[str, Any]],
                warm_start: Mapping[str, Any] | None = None) -> tuple[optuna.Study, bool]:
    """Create, resume or join the study in its storage: (study, created by this process).

    ``queued`` parameter sets run first (each once); ``warm_start`` (the base config's own
    values) is queued after them, only by the process that creates the study, so the config
    the search starts from is scored beside it exactly once.
    """
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
    if created and warm_start is not None:
        study.enqueue_trial(dict(warm_start), user_attrs={WARM_START_ATTR: True},
                            skip_if_exists=True)
    if storage.get_heartbeat_interval():  # fail and requeue dead workers' trials first
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    return study, created

