"""Real server processes on loopback for tests: free ports, health waits, clean shutdown."""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def b64(data: bytes) -> str:
    """File bytes as the served model's ``audio`` column expects them."""
    return base64.b64encode(data).decode("ascii")


def wav_bytes(audio: np.ndarray, sample_rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass  # not listening yet, or too busy to answer in 2 s: ask again
        time.sleep(0.5)
    pytest.fail(f"server not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stop(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the server's process group (the CLI and its workers) and wait until every
    process in it is gone, not just the CLI: a worker that outlives it keeps serving the port.
    SIGKILL whatever is left after ``grace_s``."""
    if not _group_alive(process.pid):
        process.wait(timeout=10)
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
        stopped = _wait_group_gone(process.pid, grace_s)
    except subprocess.TimeoutExpired:
        stopped = False
    if not stopped:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        _wait_group_gone(process.pid, 10)


@contextlib.contextmanager
def running(args: list[str], log: Path, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``python -m <args> --host 127.0.0.1 --port <free>``, wait for /health, yield
    (url, process), and always stop the whole process group."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", *args, "--host", "127.0.0.1",
                                    "--port", str(port)],
                                   env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_for_health(url, process, log)
        yield url, process
    finally:
        stop(process)


def model_server(model_uri: str, log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None, extra_args: Sequence[str] = ()):
    """``mlflow models serve -m <uri> --env-manager local`` on a free loopback port."""
    env = dict(env or os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return running(["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                    *extra_args], log, env, cwd)


def declared_distributions(requirements: list[str]) -> set[str]:
    """The requirements and everything they depend on (as installed here)."""
    seen: set[str] = set()
    todo = [canonicalize_name(Requirement(r).name) for r in requirements]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def clean_environment(folder: Path, requirements: list[str]) -> tuple[Path, list[str]]:
    """A ``sitecustomize`` (put ``folder`` on PYTHONPATH) that makes every installed package
    outside a model's requirements unimportable, so a server runs as it would in an environment
    built from them (whisper_exp itself travels with the model as code). Returns the folder and
    the blocked top-level modules."""
    allowed = declared_distributions(requirements) | {"whisper-exp"}
    blocked = sorted(
        module for module, dists in importlib.metadata.packages_distributions().items()
        if module.isidentifier() and not any(canonicalize_name(d) in allowed for d in dists))
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"for _name in {blocked!r}:\n"
        "    sys.modules.setdefault(_name, None)\n")
    return folder, blocked
