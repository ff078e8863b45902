"""MLflow plumbing shared by every entry point: run lifecycle, params, memory, tables.

``mlflow run`` creates the run and passes ``MLFLOW_RUN_ID``; a direct CLI/library call creates
its own. Either way a crash ends the run FAILED and Ctrl-C ends it KILLED, with everything logged
before that kept.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import torch
from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_ENTRY_POINT

from whisper_exp.run_journal import RunJournal, TrackingUnavailable, server_answers
from whisper_exp.run_page import mark_model_training_experiment

if TYPE_CHECKING:
    from accelerate import PartialState

log = logging.getLogger(__name__)

PROJECT_NAME = "whisper-exp"


def configure(tracking_uri: str | None, experiment_name: str | None) -> None:
    """Point MLflow at a server/DB (else its default: ``sqlite:///mlflow.db`` here)."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    # Under `mlflow run` the experiment is already chosen by the launcher (its run exists before
    # this code starts, and MLflow cannot move a run); under torchrun only rank 0 may touch the
    # tracking store.
    if not experiment_name or process_rank() != 0:
        return
    launched = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if launched:
        _warn_if_elsewhere(launched, experiment_name)
    elif not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment_name)


def _warn_if_elsewhere(experiment_id: str, experiment_name: str) -> None:
    """`mlflow run` without --experiment-name puts the run in Default, whatever the config says:
    say so where the user looks, rather than let the run go missing."""
    try:
        actual = mlflow.get_experiment(experiment_id).name
    except mlflow.exceptions.MlflowException:
        return
    if actual != experiment_name:
        log.warning("this run is in experiment %r, chosen by `mlflow run`, not in %r as the "
                    "config says; pass `mlflow run --experiment-name %s` to put it there",
                    actual, experiment_name, experiment_name)


def _is_pruned_trial(exc: BaseException) -> bool:
    """An Optuna ``TrialPruned``, detected without importing optuna (if it is not loaded, nothing
    can have raised one)."""
    optuna = sys.modules.get("optuna")
    return optuna is not None and isinstance(exc, optuna.TrialPruned)


# Seconds between samples of MLflow's system metrics sampler (its default, 10, leaves a short
# CI run with no point at all: the sampler logs nothing for a sample it has not finished).
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL still overrides it.
SYSTEM_METRICS_INTERVAL_S = 2.0


@contextlib.contextmanager
def run(run_name: str | None = None, nested: bool = False,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
        log_system_metrics: bool | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume: ``run_id``, or ``mlflow run``'s) a run that ends KILLED on Ctrl-C or an
    Optuna prune (tagged ``optuna.trial_state=PRUNED``), FAILED on any other error.

    ``log_system_metrics`` (None: as MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says) samples CPU,
    memory, disk, network (and GPU with nvidia-ml-py) into ``system/...`` metrics while the run
    is open. The run's experiment opens in the UI's model
    training views."""
    if log_system_metrics and not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                              nested=nested, tags=dict(tags or {}),
                              log_system_metrics=log_system_metrics)
    mark_model_training_experiment(active.info.experiment_id)
    try:
        yield active
        journal = _journals.get(active.info.run_id)
        if journal is not None:
            journal.require_server()  # the outage's metrics arrive before the run ends
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        stranded = _stranded(active.info.run_id, exc)
        if stranded is not None:  # ending the run would wait minutes for a server that is gone
            _forget_active_run()
            raise stranded from None
        if _is_pruned_trial(exc):
            mlflow.set_tag("optuna.trial_state", "PRUNED")
            mlflow.end_run("KILLED")
        else:
            mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


# Runs whose metrics are also kept on disk (Tracker.keep_on_disk), by run id.
_journals: dict[str, RunJournal] = {}


def _stranded(run_id: str, exc: BaseException) -> TrackingUnavailable | None:
    """The one-line error for a run that failed because its tracking server went away (the run
    is on disk), else None."""
    journal = _journals.get(run_id)
    if journal is None or isinstance(exc, KeyboardInterrupt):
        return None
    if isinstance(exc, TrackingUnavailable) or not server_answers(journal.uri):
        return TrackingUnavailable(journal.stranded_message())
    return None


def _forget_active_run() -> None:
    """Drop the active run locally, without the server call ``end_run`` (and MLflow's atexit
    hook) would make."""
    import mlflow.tracking.fluent as fluent

    stack = fluent._active_run_stack.get()
    if stack:
        stack.pop()


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Metrics of the active run, through its on-disk journal when it has one (sent when the
    server answers), else straight to MLflow."""
    active = mlflow.active_run()
    journal = _journals.get(active.info.run_id) if active else None
    values = {k: float(v) for k, v in metrics.items()}
    if journal is None:
        mlflow.log_metrics(values, step=step)
    else:
        journal.log_metrics(values, step=step)


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the working directory's checkout, only when that checkout is this project (its
    pyproject names whisper-exp): an installed package run from some other repository must
    not record that repository's commit as the code that trained the model."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd or Path.cwd(),
                             capture_output=True, text=True, timeout=10, check=True)
        root = Path(top.stdout.strip())
        pyproject = root / "pyproject.toml"
        if not pyproject.is_file() or \
                tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {}).get(
                    "name") != PROJECT_NAME:
            return None
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError, tomllib.TOMLDecodeError):
        return None


def _launcher_params() -> dict[str, str]:
    """Params the active run already holds from ``mlflow run`` (its entry point's parameters,
    empty outside a project run)."""
    active = mlflow.active_run()
    if active is None or MLFLOW_PROJECT_ENTRY_POINT not in active.data.tags:
        return {}
    return mlflow.get_run(active.info.run_id).data.params


def log_params(params: Mapping[str, Any]) -> None:
    """Params as strings (None -> ""), in chunks under MLflow's per-call limit.

    A param ``mlflow run`` already logged from an MLproject parameter of the same name (``model``
    of ``evaluate``) is left as it is: the launcher logs the shell-quoted value (``''`` for
    empty, ``'a b'``), which MLflow would refuse to "change" to the plain one."""
    launched = _launcher_params()
    items = [(k, "" if v is None else str(v)) for k, v in params.items()]
    items = [(k, v) for k, v in items
             if k not in launched or launched[k] not in (v, shlex.quote(v))]
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start:start + 100]))


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak, so runs sharing a process (Optuna trials) each report their own.

    On Linux CPU the process's RSS high-water mark is reset through ``/proc/self/clear_refs``;
    elsewhere the CPU peak stays process-wide.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _linux_peak_rss_kb() -> int | None:
    """``VmHWM`` (peak RSS since start or the last reset), or None where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(MiB, what it measures): CUDA max allocated on GPU, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    hwm_kb = _linux_peak_rss_kb()
    if hwm_kb is not None:
        return hwm_kb / 1024, "process_peak_rss"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024  # bytes on macOS, KiB on Linux
    return rss_kb * scale, "process_peak_rss"


def log_csv(rows: Sequence[Mapping[str, Any]], artifact_file: str,
            fieldnames: Sequence[str] | None = None) -> None:
    """A CSV artifact (per-utterance tables, splits, skipped rows)."""
    buffer = io.StringIO()
    names = list(fieldnames or (rows[0].keys() if rows else []))
    writer = csv.DictWriter(buffer, fieldnames=names, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    mlflow.log_text(buffer.getvalue(), artifact_file)


def log_directory(path: str | Path, artifact_path: str) -> None:
    mlflow.log_artifacts(str(path), artifact_path)


def scratch_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


# --------------------------------------------------------------------------- multi-process


def distributed_state() -> PartialState:
    """accelerate's view of this process, the one the Trainer uses.

    In a plain process it is rank 0 of 1 and creates no process group; under torchrun the first
    call joins the group (gloo on CPU, NCCL on GPUs). ``cpu`` must follow the device: without it
    accelerate takes a CPU-only torchrun for a single process on every rank."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def process_rank() -> int:
    """Global rank under torchrun/accelerate, 0 for a plain process."""
    return distributed_state().process_index


def world_size() -> int:
    return distributed_state().num_processes


class Tracker:
    """MLflow logging that only the main process does: under torchrun every rank runs the same
    training code, and exactly one of them may write to the run."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = distributed_state().is_main_process if enabled is None else enabled
        self.journal: RunJournal | None = None

    def keep_on_disk(self, output_dir: str | Path, config_yaml: str, **info: Any) -> None:
        """From now on the active run's metrics also go to ``<output_dir>/tracking/`` and
        survive a tracking server outage (see run_journal); the config is written beside them,
        so ``whisper-exp upload-run <output_dir>`` can send the run later."""
        active = mlflow.active_run()
        if not self.enabled or active is None:
            return
        self.journal = RunJournal(output_dir, active.info.run_id)
        (self.journal.folder / "config.yaml").write_text(config_yaml, encoding="utf-8")
        experiment = mlflow.get_experiment(active.info.experiment_id)
        self.journal.record_run({"experiment_name": experiment.name, **info})
        _journals[active.info.run_id] = self.journal

    def _server(self) -> None:
        """Calls that need the server wait out an outage first (or stop, the run on disk)."""
        if self.journal is not None:
            self.journal.require_server()

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.enabled:
            self._server()
            log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.enabled:
            log_metrics(metrics, step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._server()
            mlflow.log_text(text, artifact_file)

    def set_tag(self, key: str, value: Any) -> None:
        if self.enabled:
            self._server()
            mlflow.set_tag(key, value)

    def log_csv(self, rows: Sequence[Mapping[str, Any]], artifact_file: str,
                fieldnames: Sequence[str] | None = None) -> None:
        if self.enabled:
            self._server()
            log_csv(rows, artifact_file, fieldnames)

    def log_directory(self, path: str | Path, artifact_path: str) -> None:
        if self.enabled:
            self._server()
            log_directory(path, artifact_path)


@dataclass
class _RunInfo:
    run_id: str


@dataclass
class _NonMainRun:
    """What ranks other than 0 get instead of an MLflow run: an id for output paths only."""

    info: _RunInfo


@contextlib.contextmanager
def main_process_run(run_id: str | None = None, **kwargs) -> Iterator[Any]:
    """``run(...)`` on rank 0; on other ranks a stand-in that touches no tracking server but
    carries rank 0's run id (broadcast), so every rank shares ``outputs/<run_id>/``."""
    state = distributed_state()
    if state.num_processes == 1:
        with run(run_id=run_id, **kwargs) as active:
            yield active
        return
    from accelerate.utils import broadcast_object_list

    if state.is_main_process:
        with run(run_id=run_id, **kwargs) as active:
            broadcast_object_list([active.info.run_id], from_process=0)
            yield active
    else:
        shared = [None]
        broadcast_object_list(shared, from_process=0)
        yield _NonMainRun(_RunInfo(shared[0]))
