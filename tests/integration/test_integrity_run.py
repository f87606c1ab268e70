"""Integrity through run.py: task=verify on a built dataset, and DDP validation on a one-chunk split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_image_folder
from run_helpers import run, synthetic

pytestmark = pytest.mark.integration


def test_ddp_validation_on_a_one_chunk_split_counts_every_sample_once(tmp_path):
    """One val chunk, two ranks: rank 1 used to get no batch and rank 0 waited for it forever."""
    images = make_image_folder(tmp_path / "images", classes=2, train=8, val=2)  # val: 4 images = one chunk of 4
    run(*synthetic(tmp_path, images), f"data.root={tmp_path}/ds", "trainer=ddp", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.limit_val_batches=null", "trainer.max_epochs=1")
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["splits"]["val"] == 4 and meta["chunk_size"] == 4
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["metrics"]["val/samples"] == 4
    assert summary["val/acc1"] >= 0.75  # 2 classes, 4 val images: chance 1/2, measured 1.0


def test_verify_scrubs_and_names_a_damaged_shard(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=2, train=10, val=3)
    common = [*synthetic(tmp_path, images), f"data.root={tmp_path}/ds"]
    run(*common, "task=tokenize")
    ok = run(*common, "task=verify", f"hydra.run.dir={tmp_path}/v1")
    assert "no fault" in ok.stdout and ok.stdout.count("| ok |") == 3  # train: 10+10, val: 6
    shard = Path(tmp_path / "ds" / "shards" / "train-000001.tar")
    data = bytearray(shard.read_bytes())
    data[700] ^= 1
    shard.write_bytes(bytes(data))
    bad = run(*common, "task=verify", f"hydra.run.dir={tmp_path}/v2", check=False)
    assert bad.returncode != 0
    assert "train-000001.tar" in bad.stderr.strip().splitlines()[-1]
    assert json.loads((tmp_path / "v2" / "summary.json").read_text())["bad_shards"] == ["train-000001.tar"]
