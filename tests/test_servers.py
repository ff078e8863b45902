"""The test servers' own helpers: a slow /health under load is waited for, not an error."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from servers import stop, wait_for_health


def test_health_wait_outlasts_a_server_that_accepts_but_does_not_answer(tmp_path):
    """A busy server (e.g. workers still importing on a loaded CI machine) accepts the
    connection and answers late: the 2 s read timeout of one probe must not end the wait."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        log = tmp_path / "server.log"
        log.write_text("still starting")
        try:
            with pytest.raises(pytest.fail.Exception, match="not healthy after 5 s"):
                wait_for_health(url, process, log, timeout_s=5)
        finally:
            process.kill()
            process.wait()


def test_stop_waits_for_workers_that_outlive_the_server_process():
    """`mlflow models serve` exits on SIGTERM before its uvicorn workers finish: stop must wait
    for the whole process group, or the port is still served after the test's `with` block."""
    worker = "trap 'sleep 1; exit 0' TERM; while true; do sleep 0.1; done"
    leader = f"import subprocess, time; subprocess.Popen(['sh', '-c', {worker!r}]); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", leader], start_new_session=True)
    time.sleep(1)  # the worker is running and has its trap set
    stop(process)
    assert process.returncode == -signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)
