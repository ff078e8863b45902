"""A run's metrics kept on disk and sent when the tracking server answers: training survives a
server outage, and a server that never comes back leaves a folder ``whisper-exp upload-run``
sends later.

Every metric value is appended to ``<output_dir>/tracking/metrics.jsonl`` and queued; the queue
goes to the server (one ``log_batch``) whenever a quick probe (no retries, seconds) finds it up,
so a step never waits for MLflow's minutes of HTTP retries. Calls that need the server (tags,
artifacts, the run's end) first wait up to ``WHISPER_EXP_TRACKING_WAIT_S`` seconds (default
300) for it; past that the command stops with one line naming the folder and the upload command.
Only ``http(s)`` tracking servers are probed: a database or local store is written directly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
from mlflow.entities import Metric

from whisper_exp.preflight import PROBE_ENDPOINT, PreflightError, redact

log = logging.getLogger(__name__)

JOURNAL_DIR = "tracking"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
WAIT_ENV = "WHISPER_EXP_TRACKING_WAIT_S"
DEFAULT_WAIT_S = 300.0
PROBE_TIMEOUT_S = 3.0
PROBE_EVERY_S = 5.0
BATCH = 1000  # MLflow's log_batch limit on metrics per call


class TrackingUnavailable(PreflightError):
    """The tracking server went away mid-run and did not come back in time; the run is on disk."""


def wait_limit_s() -> float:
    try:
        return float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
    except ValueError:
        raise PreflightError(f"{WAIT_ENV}={os.environ[WAIT_ENV]!r} is not a number of "
                             "seconds") from None


def server_answers(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """One request without retries: does the tracking server answer at all (any status below
    500)? Non-HTTP stores always count as up (they are written directly)."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return True
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), PROBE_ENDPOINT, "GET",
                                max_retries=0, backoff_factor=0, timeout=timeout_s,
                                raise_on_status=False, params={"max_results": 1})
    except MlflowException:
        return False
    return response.status_code < 500


class RunJournal:
    """The on-disk record and send queue of one run's metrics."""

    def __init__(self, output_dir: str | Path, run_id: str, tracking_uri: str | None = None):
        self.output_dir = Path(output_dir)
        self.folder = self.output_dir / JOURNAL_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self.uri = tracking_uri or mlflow.get_tracking_uri()
        self.pending: list[Metric] = []
        self.down_since: float | None = None
        self._last_probe = 0.0

    def record_run(self, info: dict[str, Any]) -> None:
        """What ``upload-run`` needs besides metrics: experiment, run name, tags."""
        info = {"run_id": self.run_id, "tracking_uri": redact(self.uri), **info}
        (self.folder / RUN_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        stamp = int(time.time() * 1000)
        entries = [Metric(key, float(value), stamp, step or 0) for key, value in metrics.items()]
        with (self.folder / METRICS_FILE).open("a", encoding="utf-8") as handle:
            for m in entries:
                handle.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp,
                                         "step": m.step}) + "\n")
        self.pending.extend(entries)
        self.flush(wait_s=0)

    def flush(self, wait_s: float) -> bool:
        """Send the queue while the server answers; wait up to ``wait_s`` for it. True when
        everything is sent."""
        deadline = time.monotonic() + wait_s
        while self.pending:
            if self._probe_due():
                if server_answers(self.uri):
                    self._send()
                    continue
                self._mark_down()
            if time.monotonic() >= deadline:
                return False
            time.sleep(max(0.0, min(PROBE_EVERY_S, deadline - time.monotonic())))
        return True

    def require_server(self) -> None:
        """Before a call that needs the server: nothing while it is up; during an outage wait
        for it (sending the queue), else raise ``TrackingUnavailable``."""
        if self.down_since is None and not self.pending:
            return
        if not self.flush(wait_s=wait_limit_s()) or not server_answers(self.uri):
            raise TrackingUnavailable(self.stranded_message())

    def stranded_message(self) -> str:
        down = f" for {time.monotonic() - self.down_since:.0f} s" if self.down_since else ""
        return (f"tracking server {redact(self.uri)} has been unreachable{down}; run "
                f"{self.run_id}'s model, metrics and config are kept in {self.output_dir}; "
                f"send them when a server is up: whisper-exp upload-run {self.output_dir}")

    def _probe_due(self) -> bool:
        if self.down_since is None:
            return True
        if time.monotonic() - self._last_probe >= PROBE_EVERY_S:
            self._last_probe = time.monotonic()
            return True
        return False

    def _send(self) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            while self.pending:
                MlflowClient(self.uri).log_batch(self.run_id, metrics=self.pending[:BATCH])
                del self.pending[:BATCH]
        except MlflowException as exc:
            if server_answers(self.uri):
                raise  # the server refused the data: not an outage
            self._mark_down(exc)
            return
        if self.down_since is not None:
            log.info("tracking server %s is back after %.0f s; buffered metrics sent",
                     redact(self.uri), time.monotonic() - self.down_since)
            self.down_since = None

    def _mark_down(self, reason: object = "no answer") -> None:
        if self.down_since is None:
            self.down_since = self._last_probe = time.monotonic()
            log.warning("tracking server %s is unreachable (%s): training continues, metrics "
                        "are kept in %s and sent when it answers", redact(self.uri),
                        str(reason).splitlines()[0][:200], self.folder / METRICS_FILE)

def read_metrics(folder: Path) -> list[Metric]:
    path = folder / JOURNAL_DIR / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(Metric(row["key"], float(row["value"]), int(row["timestamp"]),
                              int(row["step"])))
        except (ValueError, KeyError, TypeError):
            # A line cut short by a kill mid-write: the rest of the record is still good.
            log.warning("%s line %d is not a metric record; skipped", path, number)
    return out
