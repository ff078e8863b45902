"""The suite's own rules: CI runs the README's test command, and with WHISPER_EXP_STRICT_SKIPS=1
only a declared optional asset may skip a test; no passed test at all is a failure too."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OPTIONAL_ASSET_PREFIX, skip_optional_asset

ROOT = Path(__file__).resolve().parent.parent

PASSING = "def test_passes():\n    assert True\n"
DECLARED_SKIP = ("from conftest import skip_optional_asset\n\n"
                 "def test_needs_shared():\n"
                 "    skip_optional_asset('shared', 'no real weights here')\n")
UNDECLARED_SKIP = ("import pytest\n\n"
                   "def test_quietly_skipped():\n"
                   "    pytest.skip('no PostgreSQL here')\n")
MODULE_SKIP = ("import pytest\n\n"
               "pytest.skip('whole module off', allow_module_level=True)\n")


def _pytest_in(folder: Path, files: dict[str, str], strict: bool) -> subprocess.CompletedProcess:
    """Run pytest on a throwaway suite that uses this project's conftest."""
    shutil.copy(ROOT / "tests" / "conftest.py", folder / "conftest.py")
    for name, text in files.items():
        (folder / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "WHISPER_EXP_STRICT_SKIPS"}
    if strict:
        env["WHISPER_EXP_STRICT_SKIPS"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(folder)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("files, exit_code, message", [
    ({"test_a.py": PASSING, "test_b.py": DECLARED_SKIP}, 0, None),
    ({"test_a.py": PASSING, "test_b.py": UNDECLARED_SKIP}, 1,
     "test_b.py::test_quietly_skipped: no PostgreSQL here"),
    ({"test_a.py": PASSING, "test_b.py": MODULE_SKIP}, 1, "test_b.py: whole module off"),
    ({"test_b.py": DECLARED_SKIP}, 1, "no test passed"),
    ({"test_empty.py": ""}, 1, "no test passed (pytest exit status 5)"),
])
def test_strict_mode_fails_on_undeclared_skips_and_empty_sessions(tmp_path, files, exit_code,
                                                                  message):
    done = _pytest_in(tmp_path, files, strict=True)
    assert done.returncode == exit_code, done.stdout[-3000:] + done.stderr[-2000:]
    if message:
        assert message in done.stdout, done.stdout[-3000:]


def test_without_strict_mode_a_skip_is_only_reported(tmp_path):
    done = _pytest_in(tmp_path, {"test_a.py": PASSING, "test_b.py": UNDECLARED_SKIP},
                      strict=False)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 passed, 1 skipped" in done.stdout


def test_only_declared_assets_can_be_skipped_for():
    with pytest.raises(ValueError, match="'postgres' is not a declared optional asset"):
        skip_optional_asset("postgres", "no server")
    with pytest.raises(pytest.skip.Exception, match=re.escape(OPTIONAL_ASSET_PREFIX + "chromium")):
        skip_optional_asset("chromium", "no browser")


def test_ci_runs_the_readme_test_command_in_strict_mode():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"Test command.*?```bash\n(.*?)\n```", readme, re.S).group(1).strip()
    assert command == "WHISPER_EXP_STRICT_SKIPS=1 python -m pytest -q"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == command, ".ci/run runs exactly the README's test command"
    assert "set -euo pipefail" in ci, "a failing step fails CI"


def test_a_test_that_sets_an_experiment():
    """With the next test: set_experiment exports MLFLOW_EXPERIMENT_ID, and the per-test
    isolation must not carry it into later tests (or their module fixtures)."""
    import mlflow

    mlflow.set_experiment("exports-its-id")
    assert os.environ.get("MLFLOW_EXPERIMENT_ID")


def test_the_next_test_does_not_inherit_it():
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ
