"""Rank and world size of an offline job (embed, curate) launched by torchrun or srun.

Training gets these from Lightning; the offline jobs read the launcher's environment, so
``torchrun --nproc_per_node 8 run.py task=embed`` or an ``srun`` array just works.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable


def rank_world() -> tuple[int, int]:
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if world in os.environ:
            return int(os.environ.get(rank, 0)), int(os.environ[world])
    return 0, 1


def local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK, srun's SLURM_LOCALID): its GPU index."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def launch_id() -> str:
    """What every rank of one launch shares and a relaunch does not (for torchrun, pass --standalone or
    --rdzv-id for a fresh id per launch; srun's job and step ids always are): ranks use it to tell
    their own rank 0's go-ahead from one an earlier launch left behind."""
    keys = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_STEP_ID",
            "SLURM_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT")
    return "|".join(f"{k}={os.environ[k]}" for k in keys if k in os.environ)


def wait_for(done: Callable[[], bool], what: str, timeout_s: float = 24 * 3600, poll_s: float = 2.0) -> None:
    """Block until ``done()``; other ranks' progress is seen through files, no process group needed."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")
        time.sleep(poll_s)


def all_exist(paths: list[Path]) -> Callable[[], bool]:
    return lambda: all(p.is_file() for p in paths)
