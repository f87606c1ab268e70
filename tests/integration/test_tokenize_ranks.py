"""task=tokenize on several ranks: the bytes of one process, and a rank that fails or never comes is resumed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_image_folder
from fork_server import env
from run_helpers import run

pytestmark = pytest.mark.integration


def _tokenize(tmp: Path, images: Path, root: str) -> list[str]:
    return ["task=tokenize", f"data.root={tmp / root}", f"data.build.source={images}", f"paths.log_dir={tmp}/logs",
            f"hydra.run.dir={tmp}/run_{root}", "print_config=false", "data.build.shard_size=8",
            "data.build.chunk_size=4", "data.build.workers=1", "data.build.codec_fit_samples=8", "tokenizer.image_size=16", "tokenizer.patch_size=2",
            "tokenizer.codebook_size=32", "tokenizer.codebook_dim=4"]


def _ranks(*overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "run.py", *overrides], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)


def _as_rank(rank: int, world: int, port: int, *overrides: str) -> subprocess.CompletedProcess:
    """One rank of a launch, started by hand (as srun would): its rank and world from the environment."""
    return run(*overrides, check=False, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _shards(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "shards").iterdir())}


def _entries(root: Path) -> list[dict]:
    return json.loads((root / "dataset.json").read_text())["shards"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process's dataset, and the images it came from (JPEG: decoded in the loader's workers)."""
    tmp = tmp_path_factory.mktemp("ranks")
    images = make_image_folder(tmp / "images", classes=3, train=20, val=6, fmt="JPEG")  # 8 + 3 shards
    run(*_tokenize(tmp, images, "one"))
    return tmp, images, tmp / "one"


def test_two_ranks_write_one_process_bytes_and_resume_after_a_rank_fails(reference):
    tmp, images, one = reference
    from seit.data.image_source import list_source
    from seit.pipelines.tokenize_plan import plan_shards, shuffle

    listing = list_source(str(images))
    shuffle(listing, 0)
    plan = list(plan_shards(listing.splits, 8).items())
    name, (_, records) = plan[5]  # shard 5 is rank 1's (5 % 2)
    bad = Path(records[3].path)
    good = bad.read_bytes()
    bad.write_bytes(b"not a jpeg")
    fitted = f"tokenizer.checkpoint={one}.tokenizer.safetensors"  # fitting one would read the bad image
    try:
        failed = _ranks(*_tokenize(tmp, images, "two"), fitted)
    finally:
        bad.write_bytes(good)
    assert failed.returncode != 0
    out = failed.stdout + failed.stderr
    assert f"cannot read image {bad}" in out  # torchrun then stops rank 0 too
    written = {p.name for p in (tmp / "two" / "shards").iterdir()}
    assert {"train-000001.tar", "train-000003.tar"} <= written and name not in written  # rank 1 got as far as 5

    resumed = _ranks(*_tokenize(tmp, images, "two"), fitted)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming:" in resumed.stdout + resumed.stderr
    assert _shards(tmp / "two") == _shards(one) and len(_shards(one)) == 11
    assert _entries(tmp / "two") == _entries(one)
    assert not (tmp / "two" / ".progress").exists()


def test_a_rank_that_never_comes_is_named_and_one_process_finishes(reference):
    tmp, images, one = reference
    lone = _as_rank(0, 2, 29611, *_tokenize(tmp, images, "three"), "data.build.rank_stall_s=3")
    assert lone.returncode != 0
    assert "no shard finished in 3s (data.build.rank_stall_s)" in lone.stderr + lone.stdout
    assert "from rank(s) [1]" in lone.stderr + lone.stdout
    assert len(_shards(tmp / "three")) == 6  # rank 0's shards 0, 2, ..., 10 are kept

    run(*_tokenize(tmp, images, "three"))  # the same command on one process resumes
    assert _shards(tmp / "three") == _shards(one)
