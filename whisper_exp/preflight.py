"""Check the tracking store before any work starts, in seconds, with one line saying what to do.

MLflow's client retries an unreachable server for about 5 minutes and then ends in a traceback;
a run whose results cannot be recorded should not start at all. One request (no retries, a short
timeout) to an ``http(s)`` tracking server, or one connection (short connect timeout) to a
PostgreSQL/MySQL database, decides. SQLite only needs its folder to exist.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

TIMEOUT_S = 3.0
# An endpoint every MLflow tracking server has; it needs the caller's credentials on an
# authenticated server (so a missing login shows here too). /health does not.
PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/search"
CREDENTIAL_VARS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
NETWORK_DATABASES = ("postgresql", "mysql", "mssql")
WHAT_TO_DO = ("start it, or point --tracking-uri / MLFLOW_TRACKING_URI at a running one "
              "(unset: a local sqlite:///mlflow.db)")


class PreflightError(RuntimeError):
    """The tracking store (or Optuna storage) cannot be reached: nothing would be recorded."""


def redact(uri: str) -> str:
    """The URI without a password (``user:***@host``), for messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_tracking_uri(uri: str | None = None, timeout_s: float = TIMEOUT_S) -> None:
    """Raise ``PreflightError`` when the tracking store ``uri`` (None: MLflow's current one,
    from ``MLFLOW_TRACKING_URI`` or the default) cannot be reached."""
    import mlflow

    uri = uri or mlflow.get_tracking_uri()
    scheme = urlsplit(uri).scheme.split("+", 1)[0]
    if scheme in ("http", "https"):
        _check_http(uri, timeout_s)
    else:
        check_database(uri, "tracking store", timeout_s)


def _check_http(uri: str, timeout_s: float) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    shown = redact(uri)
    try:
        response = http_request(get_default_host_creds(uri), PROBE_ENDPOINT, "GET",
                                max_retries=0, backoff_factor=0, timeout=timeout_s,
                                raise_on_status=False, params={"max_results": 1})
    except MlflowException as exc:
        reason = (f"no answer within {timeout_s:g} s" if "timeout" in str(exc).lower()
                  else "cannot connect")
        raise PreflightError(f"tracking server {shown} is unreachable ({reason}); {WHAT_TO_DO}"
                             ) from None
    status = response.status_code
    if status in (401, 403):
        raise PreflightError(
            f"tracking server {shown} refused the request (HTTP {status}): set "
            f"{CREDENTIAL_VARS} to an account with access")
    if status >= 500 or status == 404:
        raise PreflightError(f"tracking server {shown} answered HTTP {status} to "
                             f"{PROBE_ENDPOINT}: it is not a working MLflow server; {WHAT_TO_DO}")


_REFUSED_CODES = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}
_ENDPOINT = re.compile(r"endpoint (/\S+)")
# What a refused request was trying to do, by MLflow REST endpoint (the rest: its path).
_ACTIONS = {
    "runs/create": "creating a run in the experiment",
    "registered-models/alias": "moving a registered model's alias",
    "model-versions/create": "adding a version to the registered model",
    "registered-models/create": "creating a registered model",
    "experiments/create": "creating an experiment",
    "runs/update": "updating the run",
    "runs/log-batch": "logging to the run",
    "runs/set-tag": "tagging the run",
}


def refusal(exc: BaseException, uri: str | None = None) -> PreflightError | None:
    """A one-line ``PreflightError`` for an MLflow call the tracking server refused (HTTP 401/403
    of an authenticated server: no/wrong login, or a permission the user lacks), else None.

    Names the server, what was refused and the user (never the password)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException) or exc.error_code not in _REFUSED_CODES:
        return None
    import mlflow

    status = _REFUSED_CODES[exc.error_code]
    shown = redact(uri or mlflow.get_tracking_uri())
    found = _ENDPOINT.search(str(exc))
    endpoint = found.group(1) if found else ""
    action = next((text for key, text in _ACTIONS.items() if endpoint.endswith(key)),
                  f"the request {endpoint}".rstrip())
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401 or not user:
        return PreflightError(f"tracking server {shown} refused {action} (HTTP {status}, not "
                              f"logged in): set {CREDENTIAL_VARS} to an account with access")
    return PreflightError(f"tracking server {shown} refused {action} for user {user!r} (HTTP "
                          "403, permission denied): ask the server's admin for EDIT (or MANAGE) "
                          f"permission on it, or set {CREDENTIAL_VARS} to an account that has "
                          "it")


def check_database(uri: str, label: str = "tracking store", timeout_s: float = TIMEOUT_S) -> None:
    """SQLite: its folder exists. PostgreSQL/MySQL/MSSQL: one connection within ``timeout_s``
    (skipped when the driver is not installed: the real use reports that itself)."""
    scheme = urlsplit(uri).scheme.split("+", 1)[0]
    if scheme == "sqlite":
        _check_sqlite(uri, label)
    elif scheme in NETWORK_DATABASES:
        _check_network_database(uri, label, timeout_s)


def _check_sqlite(uri: str, label: str) -> None:
    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        return
    folder = Path(path).expanduser().parent
    if not folder.is_dir():
        raise PreflightError(f"{label} {uri}: folder {folder} does not exist; create it or "
                             "use another path")


def _check_network_database(uri: str, label: str, timeout_s: float) -> None:
    import sqlalchemy
    from sqlalchemy.exc import DBAPIError, NoSuchModuleError

    try:
        engine = sqlalchemy.create_engine(
            uri, connect_args={"connect_timeout": max(1, round(timeout_s))})
    except (ImportError, NoSuchModuleError) as exc:
        log.debug("no driver to check %s: %s", redact(uri), exc)
        return
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        reason = _first_line(exc.orig if exc.orig is not None else exc)
        raise PreflightError(f"{label} {redact(uri)} is unreachable ({reason}); start the "
                             "database or fix the URI") from None
    finally:
        engine.dispose()
