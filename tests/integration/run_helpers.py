"""Run run.py as a user does, in a child process, with overrides that keep everything in tmp dirs."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from fork_server import FORK_SERVER, env


def run(*overrides: str, check: bool = True, **env_overrides: str | None) -> subprocess.CompletedProcess:
    """``python run.py OVERRIDES`` (forked by ``FORK_SERVER`` where it can be); an env override of None
    removes that variable."""
    proc = subprocess.run([FORK_SERVER.python(), "run.py", *overrides], cwd=REPO, env=env(**env_overrides),
                          capture_output=True, text=True, timeout=600)
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


def start(*overrides: str, output: bool = False, fresh: bool = False) -> subprocess.Popen:
    """run.py in the background (for tests that interrupt it); ``output``: stdout and stderr piped, as
    text; ``fresh``: in a fresh interpreter, for tests that read the process tree under it."""
    pipe = subprocess.PIPE if output else subprocess.DEVNULL
    python = sys.executable if fresh else FORK_SERVER.python()
    return subprocess.Popen([python, "run.py", *overrides], cwd=REPO, env=env(), stdout=pipe,
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
