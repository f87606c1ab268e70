"""The fork server's ``python`` answers as a fresh interpreter does: the same exit status, output,
environment and working dir, signals delivered, and nothing left running when it is killed
(run_helpers.ForkServer, fork_server.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from fork_server import FORK_SERVER, env

pytestmark = pytest.mark.integration


def fork(argv: list[str], **env_overrides) -> subprocess.CompletedProcess:
    python = FORK_SERVER.python()
    assert python != sys.executable, "the fork server did not start"
    return subprocess.run([python, *argv], cwd=REPO, env=env(**env_overrides), capture_output=True, text=True,
                          timeout=300)


def both(argv: list[str]) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    fresh = subprocess.run([sys.executable, *argv], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    return fresh, fork(argv)


def test_a_forked_run_py_answers_as_a_fresh_interpreter_does(tmp_path):
    argv = ["run.py", "task=train", "data.batch_size=0", f"paths.log_dir={tmp_path}/logs",
            f"hydra.run.dir={tmp_path}/run", "print_config=false"]
    fresh, forked = both(argv)
    assert forked.returncode == fresh.returncode == 1
    assert forked.stderr.strip().splitlines()[-1] == fresh.stderr.strip().splitlines()[-1]
    assert "data.batch_size=0" in forked.stderr

    traced = fork(argv, HYDRA_FULL_ERROR="1")  # the request's environment...
    assert "Traceback (most recent call last)" in traced.stderr
    again = fork(argv)  # ...stayed in that child
    assert "Traceback" not in again.stderr and again.stderr == forked.stderr


@pytest.mark.parametrize("code, status", [
    ("import sys; print(sys.argv, sys.path[0] == ''); sys.exit(3)", 3),
    ("import sys, threading, atexit; atexit.register(print, 'atexit'); "
     "threading.Thread(target=lambda: print('thread joined')).start(); sys.exit('bye')", 1),
    ("raise ValueError('boom')", 1),
    ("raise KeyboardInterrupt", -signal.SIGINT),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL),
    ("import sys; open(sys.argv[1], 'w').write('kept'); print(open(sys.argv[1]).read() or 'lost', file=sys.stderr)", 0),
])
def test_exit_status_output_and_shutdown_match(code, status, tmp_path):
    fresh, forked = both(["-c", code, str(tmp_path / "unclosed"), "b"])
    assert forked.returncode == fresh.returncode == status
    assert forked.stderr == fresh.stderr  # no frames of the fork server in a traceback either
    assert forked.stdout == fresh.stdout


def test_each_child_draws_its_own_seeds_and_lightning_reads_its_rank_from_its_environment():
    draw = "import numpy, torch; print(numpy.random.randint(1 << 30), torch.randint(1 << 30, ()).item())"
    first, second = (fork(["-c", draw]).stdout.split() for _ in range(2))
    assert first[0] != second[0] and first[1] != second[1]
    code = "from pytorch_lightning.utilities import rank_zero_only; print(rank_zero_only.rank)"
    assert fork(["-c", code], LOCAL_RANK="1").stdout.strip() == "1"
    assert fork(["-c", code]).stdout.strip() == "0"


def test_signals_reach_the_child_and_a_killed_client_takes_it_along():
    sleeper = ("import os, signal, sys, time; signal.signal(signal.SIGUSR1, lambda *_: sys.exit(7)); "
               "print(os.getpid(), flush=True); time.sleep(60)")
    proc = subprocess.Popen([FORK_SERVER.python(), "-c", sleeper], env=env(), stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    assert child != proc.pid
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == 7

    proc = subprocess.Popen([FORK_SERVER.python(), "-c", sleeper], env=env(), stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}"), "the forked child outlived its killed client"
