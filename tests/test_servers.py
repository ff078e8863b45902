"""The test servers' own helpers: a slow /health under load is waited for, not an error."""

import socket
import subprocess
import sys

import pytest
from servers import wait_for_health


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
