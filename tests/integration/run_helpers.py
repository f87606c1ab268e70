"""Run run.py as a user does, in a subprocess, with overrides that keep everything in tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


# One torch thread per run.py unless the environment says otherwise: the test models are tiny, so a
# second thread buys little, and DDP tests run two processes on two cores (A/B on this 2-core machine:
# test_assembly_run 24-26 s with one thread, 30-36 s with two).
THREADS = {"OMP_NUM_THREADS": "1"}


def run(*overrides: str, check: bool = True, **env_overrides: str | None) -> subprocess.CompletedProcess:
    """run.py in a subprocess; an env override of None removes that variable."""
    env = {**THREADS, **os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **env_overrides}
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.run([sys.executable, "run.py", *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
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


def start(*overrides: str) -> subprocess.Popen:
    """run.py in the background (for tests that interrupt it)."""
    env = {**THREADS, **os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "run.py", *overrides], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
