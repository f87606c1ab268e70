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


def wait_for(done: Callable[[], bool], what: str, timeout_s: float = 24 * 3600, poll_s: float = 2.0) -> None:
    """Block until ``done()``; other ranks' progress is seen through files, no process group needed."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")
        time.sleep(poll_s)


def all_exist(paths: list[Path]) -> Callable[[], bool]:
    return lambda: all(p.is_file() for p in paths)
