"""curate=copydedup through run.py: thumbnails of train and val, copies planted in train (of train
images and of val images), relative + self dedup, then SemDeDup on the survivors (curate.start_from)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from run_helpers import run, synthetic

pytestmark = pytest.mark.integration
TRAIN_COPIES, VAL_COPIES = 4, 3


def block_images(root, classes: int = 3, train: int = 10, val: int = 4, size: int = 16):
    """Every image its own random 4x4 grid of coloured blocks, so unrelated images look unrelated;
    then exact copies planted in train: TRAIN_COPIES of train images, VAL_COPIES of val images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                blocks = rng.integers(0, 256, (4, 4, 3)).repeat(size // 4, 0).repeat(size // 4, 1)
                Image.fromarray(blocks.astype(np.uint8)).save(d / f"{split}_{c}_{i:03d}.png")
    for i in range(TRAIN_COPIES):
        src = root / "train" / f"class{i % classes}" / f"train_{i % classes}_{i:03d}.png"
        shutil.copy(src, src.with_name(src.stem + "_dup.png"))
    for i in range(VAL_COPIES):
        shutil.copy(root / "val" / f"class{i}" / f"val_{i}_000.png", root / "train" / f"class{i}" / f"zz_valcopy_{i}.png")
    return root


def kept_keys(run_dir) -> set[str]:
    return {r.split("\t")[0] for r in (run_dir / "subset.tsv").read_text().splitlines()[1:]}


def test_copydedup_removes_planted_copies_then_semdedup_starts_from_it(tmp_path):
    images = block_images(tmp_path / "images")
    base = [*synthetic(tmp_path, images), f"data.root={tmp_path}/ds", "model.depth=1"]
    thumb = ["task=embed", "task.features=thumbnail", "task.thumbnail_grid=4"]
    run(*base, *thumb, f"task.out_dir={tmp_path}/emb_train", f"hydra.run.dir={tmp_path}/e_train")
    run(*base, *thumb, "task.split=val", f"task.out_dir={tmp_path}/emb_val", f"hydra.run.dir={tmp_path}/e_val")
    keys = (tmp_path / "emb_train" / "keys.txt").read_text().split()
    assert len(keys) == 30 + TRAIN_COPIES + VAL_COPIES

    curate = [*base, "task=curate", f"task.embeddings={tmp_path}/emb_train"]
    # DINOv2's thresholds (0.6, 0.45): unrelated block images measured at cos <= 0.41, copies at 1.0
    run(*curate, "curate=copydedup", f"curate.reference_embeddings=[{tmp_path}/emb_val]", f"hydra.run.dir={tmp_path}/copy")
    got = kept_keys(tmp_path / "copy")
    assert not any("valcopy" in k for k in got)  # every copy of a val image left the pool
    originals = [k.removesuffix("_dup") for k in keys if k.endswith("_dup")]
    assert all((o in got) != (o + "_dup" in got) for o in originals)  # one of each planted pair stays
    assert len(got) == len(keys) - TRAIN_COPIES - VAL_COPIES  # and nothing else was removed
    report = json.loads((tmp_path / "copy" / "report.json").read_text())["copydedup"]
    assert report["removed_relative"] == VAL_COPIES and report["removed_self"] == TRAIN_COPIES
    assert report["largest_component"] == 2 and report["num_reference"] == 12
    assert json.loads((tmp_path / "copy" / "subset.json").read_text())["method"] == "copydedup"

    run(*curate, "curate=semdedup", "curate.kmeans.k=3", "curate.kmeans.niter=5", "curate.eps=0.001",
        f"curate.start_from={tmp_path}/copy", f"hydra.run.dir={tmp_path}/sem")
    assert kept_keys(tmp_path / "sem") <= got

    run(*base, f"data.subset={tmp_path}/copy", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}/train")
    assert f"{len(got)} of {len(keys)} train samples (copydedup)" in (tmp_path / "train" / "run.log").read_text()


def test_reference_stores_whitened_by_the_pool_or_refused(tmp_path):
    images = block_images(tmp_path / "images", classes=3, train=5, val=2)
    base = [*synthetic(tmp_path, images), f"data.root={tmp_path}/ds", "model.depth=1"]

    def embed(name: str, *extra: str) -> str:
        run(*base, "task=embed", "task.features=thumbnail", *extra, f"task.out_dir={tmp_path}/{name}",
            f"hydra.run.dir={tmp_path}/e_{name}")
        return f"curate.reference_embeddings=[{tmp_path}/{name}]"

    embed("pool", "task.thumbnail_grid=2", "task.whiten=4")
    curate = [*base, "task=curate", "curate=copydedup", f"task.embeddings={tmp_path}/pool"]
    proc = run(*curate, embed("val_w", "task.thumbnail_grid=2", "task.whiten=4", "task.split=val"),
               f"hydra.run.dir={tmp_path}/c1", check=False)
    assert proc.returncode != 0 and "val_w/whitening.npz is not" in proc.stdout + proc.stderr
    proc = run(*curate, embed("val_g4", "task.thumbnail_grid=4", "task.split=val"), f"hydra.run.dir={tmp_path}/c2",
               check=False)
    assert proc.returncode != 0 and "checkpoint_sha256 (thumbnail4 vs thumbnail2)" in proc.stdout + proc.stderr
    # an unwhitened reference of the same descriptor is whitened with the pool's PCA: the val copies go
    run(*curate, embed("val_raw", "task.thumbnail_grid=2", "task.split=val"), "curate.relative_threshold=0.99",
        "curate.threshold=0.99", f"hydra.run.dir={tmp_path}/c3")
    report = json.loads((tmp_path / "c3" / "report.json").read_text())["copydedup"]
    assert report["num_reference"] == 6 and report["removed_relative"] == VAL_COPIES
    assert not any("valcopy" in k for k in kept_keys(tmp_path / "c3"))
