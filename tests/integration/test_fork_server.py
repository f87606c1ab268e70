"""The fork server gives run.py what a fresh ``python run.py`` gets: the same exit status, the same
output, its own environment and working dir (run_helpers.ForkServer, fork_server.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from run_helpers import FORK_SERVER, env

pytestmark = pytest.mark.integration


def test_a_forked_run_py_answers_as_a_fresh_interpreter_does(tmp_path):
    argv = ["run.py", "task=train", "data.batch_size=0", f"paths.log_dir={tmp_path}/logs",
            f"hydra.run.dir={tmp_path}/run", "print_config=false"]
    fresh = subprocess.run([sys.executable, *argv], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    forked = FORK_SERVER.run(argv, env(), timeout=300)
    assert forked is not None, "the fork server did not start"
    assert forked.returncode == fresh.returncode == 1
    assert forked.stderr.strip().splitlines()[-1] == fresh.stderr.strip().splitlines()[-1]
    assert "data.batch_size=0" in forked.stderr

    traced = FORK_SERVER.run(argv, env(HYDRA_FULL_ERROR="1"), timeout=300)  # the request's environment...
    assert "Traceback (most recent call last)" in traced.stderr
    again = FORK_SERVER.run(argv, env(), timeout=300)  # ...stayed in that child
    assert "Traceback" not in again.stderr and again.stderr == forked.stderr
