"""Run run.py as a user does, in a child process, with overrides that keep everything in tmp dirs."""

from __future__ import annotations

import atexit
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from conftest import REPO


# One torch thread per run.py unless the environment says otherwise: the test models are tiny, so a
# second thread buys little, and DDP tests run two processes on two cores (A/B on this 2-core machine:
# test_assembly_run 24-26 s with one thread, 30-36 s with two).
THREADS = {"OMP_NUM_THREADS": "1"}


def env(**overrides: str | None) -> dict[str, str]:
    """The environment run.py gets in the tests; an override of None removes that variable."""
    out = {**THREADS, **os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **overrides}
    return {k: v for k, v in out.items() if v is not None}


class ForkServer:
    """Starts ``python run.py ARGS`` as a child of ``fork_server.py``, which has imported torch, timm and
    Lightning once per pytest worker (about 11 s saved per start on 2 cores). ``SEIT_TEST_FORK=0``, an
    environment whose import-time variables differ from the server's, or a second concurrent caller
    gets a plain subprocess instead."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.lock = threading.Lock()

    def usable(self, env_: dict[str, str]) -> bool:
        from fork_server import IMPORT_TIME_ENV

        if os.environ.get("SEIT_TEST_FORK", "1") == "0" or not hasattr(os, "fork"):
            return False
        if self.proc is None or self.proc.poll() is not None:
            self.env = env()
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fork_server.py"))],
                                         cwd=REPO, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True)
            atexit.register(self.proc.stdin.close)
            if "ready" not in json.loads(self.proc.stdout.readline() or "{}"):
                self.proc.kill()
                return False
        return all(env_.get(k) == self.env.get(k) for k in IMPORT_TIME_ENV)

    def run(self, argv: list[str], env_: dict[str, str], timeout: float) -> subprocess.CompletedProcess | None:
        """run.py's CompletedProcess (text stdout and stderr), or None when a plain subprocess must do."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            if not self.usable(env_):
                return None
            with tempfile.TemporaryDirectory() as tmp:
                out, err = f"{tmp}/stdout", f"{tmp}/stderr"
                request = {"argv": argv, "cwd": str(REPO), "env": env_, "stdout": out, "stderr": err}
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
                pid = self._reply()["pid"]
                timed_out = threading.Event()
                timer = threading.Timer(timeout, lambda: (timed_out.set(), os.kill(pid, signal.SIGKILL)))
                timer.start()
                code = self._reply()["returncode"]
                timer.cancel()
                if timed_out.is_set():
                    raise subprocess.TimeoutExpired(argv, timeout, Path(out).read_text(), Path(err).read_text())
                return subprocess.CompletedProcess([sys.executable, *argv], code, Path(out).read_text(),
                                                   Path(err).read_text())
        finally:
            self.lock.release()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server (pid {self.proc.pid}) ended (status {self.proc.wait()}); "
                               "its stderr is in the test output; SEIT_TEST_FORK=0 runs without it")
        return json.loads(line)


FORK_SERVER = ForkServer()


def run(*overrides: str, check: bool = True, **env_overrides: str | None) -> subprocess.CompletedProcess:
    """``python run.py OVERRIDES`` (forked from ``FORK_SERVER`` where it can be); an env override of None
    removes that variable."""
    env_ = env(**env_overrides)
    proc = FORK_SERVER.run(["run.py", *overrides], env_, timeout=600) or subprocess.run(
        [sys.executable, "run.py", *overrides], cwd=REPO, env=env_, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def paths(tmp: Path) -> list[str]:
    return [f"paths.data_dir={tmp}/tokens", f"paths.log_dir={tmp}/logs", f"hydra.run.dir={tmp}/run",
            "print_config=false"]


def synthetic(tmp: Path, images: Path, **tok) -> list[str]:
    """Overrides that train a tiny token model on a synthetic image folder."""
    t = {"image_size": 16, "patch_size": 2, "codebook_size": 32, "codebook_dim": 4, **tok}
    return [*paths(tmp), f"data.build.source={images}", "data.build.workers=0", "data.build.shard_size=10",
            "data.build.chunk_size=4", "debug=fast", "aug.crop=6", *[f"tokenizer.{k}={v}" for k, v in t.items()]]


def start(*overrides: str, output: bool = False) -> subprocess.Popen:
    """run.py in the background (for tests that interrupt it); ``output``: stdout and stderr piped, as text."""
    pipe = subprocess.PIPE if output else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "run.py", *overrides], cwd=REPO, env=env(), stdout=pipe,
                            stderr=subprocess.STDOUT if output else subprocess.DEVNULL, text=output)


def resumable(tmp: Path, images: Path, epochs: int) -> list[str]:
    """A synthetic run of ``epochs`` x 9 steps (36 train images, batch 4) that checkpoints every 3 steps:
    long enough to interrupt mid-way, with a warm-up then cosine LR to compare after a resume."""
    return [*synthetic(tmp, images), f"data.root={tmp}/ds", f"trainer.max_epochs={epochs}",
            "trainer.limit_train_batches=null", "data.batch_size=4", "scheduler.warmup_epochs=2",
            "callbacks.last_checkpoint.every_n_train_steps=3"]


def final_lr(run_dir: Path) -> tuple[int, float]:
    """The step and LR of the last logged training row of a run's csv/metrics.csv."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/lr/pg1")]
    return int(rows[-1]["step"]), float(rows[-1]["train/lr/pg1"])
