"""task=curate under a 2-rank launch (RANK/WORLD_SIZE as torchrun sets them) through run.py: SemDeDup
split over the ranks by cluster keeps exactly what one rank keeps; hierarchical streams the memmap."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from conftest import make_image_folder
from conftest import REPO
from fork_server import FORK_SERVER, THREADS
from run_helpers import run, synthetic

pytestmark = pytest.mark.integration


def _ranks(*overrides: str, world: int = 2) -> None:
    """run.py once per rank, as torchrun would start them (gloo on CPU)."""
    port = str(29700 + os.getpid() % 500)
    procs = []
    for rank in range(world):
        env = {**THREADS, **os.environ, "WANDB_MODE": "disabled", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([FORK_SERVER.python(), "run.py", *overrides[:-1], f"{overrides[-1]}/rank{rank}"],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-4000:]


def test_semdedup_on_two_ranks_keeps_what_one_rank_keeps(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=4, train=20, val=4)
    base = [*synthetic(tmp_path, images), f"data.root={tmp_path}/ds", "model.depth=1"]
    thumb = tmp_path / "thumb"
    run(*base, "task=embed", "task.features=thumbnail", "task.thumbnail_grid=2", f"task.out_dir={thumb}",
        f"hydra.run.dir={tmp_path}/e")
    curate = [*base, "task=curate", "curate=semdedup", "curate.kmeans.k=6", "curate.kmeans.niter=5",
              "curate.kmeans.backend=torch", "curate.target_kept=0.8", "curate.probes=2", "curate.device=cpu",
              f"task.embeddings={thumb}"]
    run(*curate, f"task.out_dir={tmp_path}/one", f"hydra.run.dir={tmp_path}/one_run")
    _ranks(*curate, f"task.out_dir={tmp_path}/two", f"hydra.run.dir={tmp_path}/two_run")
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "kept.npy"), np.load(tmp_path / "one" / "kept.npy"))
    assert (tmp_path / "two" / "subset.tsv").read_text() == (tmp_path / "one" / "subset.tsv").read_text()
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert one.get("eps") == two.get("eps") and 60 <= len(np.load(tmp_path / "one" / "kept.npy")) < 80

    run(*base, "task=curate", "curate=hierarchical", "curate.levels=[8,2]", "curate.resampling_steps=2",
        "curate.keep_fraction=0.25", "curate.chunk=16", f"task.embeddings={thumb}", f"hydra.run.dir={tmp_path}/h")
    assert json.loads((tmp_path / "h" / "summary.json").read_text())["num_kept"] == 20
