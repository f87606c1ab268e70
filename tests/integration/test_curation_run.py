"""Curation through run.py as a user runs it: train, embed, curate (every method), train on the subset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_image_folder
from run_helpers import run, synthetic

pytestmark = pytest.mark.integration


def summary(path) -> dict:
    return json.loads((path / "summary.json").read_text())


def test_embed_curate_and_train_on_the_subset(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=4, train=20, val=4)
    base = [*synthetic(tmp_path, images), f"data.root={tmp_path}/ds", "model.depth=1"]
    run(*base, f"hydra.run.dir={tmp_path}/clf")
    ckpt = summary(tmp_path / "clf")["last_ckpt_path"]
    assert summary(tmp_path / "clf")["val/acc1"] >= 0.6  # 4 colour classes: chance 1/4, measured 1.0
    emb = tmp_path / "emb"
    run(*base, "task=embed", f"task.checkpoint={ckpt}", f"task.out_dir={emb}", f"hydra.run.dir={tmp_path}/e1")
    meta = json.loads((emb / "embeddings.json").read_text())
    assert meta["num_samples"] == 80 and meta["model_kind"] == "classifier"
    vectors = np.load(emb / "embeddings.npy")
    assert vectors.dtype == np.float16 and np.allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1, atol=3e-3)

    thumb = tmp_path / "thumb"
    run(*base, "task=embed", "task.features=thumbnail", "task.thumbnail_grid=2", "task.whiten=6",
        f"task.out_dir={thumb}", f"hydra.run.dir={tmp_path}/e2")
    curate, km = [*base, "task=curate"], ["curate.kmeans.k=4", "curate.kmeans.niter=5"]
    run(*curate, *km, "curate=semdedup", "curate.target_kept=0.9", f"task.embeddings={thumb}", f"hydra.run.dir={tmp_path}/dedup")
    dedup = summary(tmp_path / "dedup")
    assert dedup["num_kept"] >= 72 and (tmp_path / "dedup" / "report.json").is_file()

    run(*curate, *km, "curate=dbp", "curate.keep_fraction=0.5", f"curate.start_from={tmp_path}/dedup",
        f"task.embeddings={emb}", f"task.write_dataset={tmp_path}/ds_half", f"hydra.run.dir={tmp_path}/dbp")
    dbp = summary(tmp_path / "dbp")
    assert dbp["num_kept"] == 40
    for png in ("cluster_sizes.png", "keep_rate_vs_complexity.png"):
        assert (tmp_path / "dbp" / png).is_file()
    kept = np.load(tmp_path / "dbp" / "kept.npy")
    assert set(kept) <= set(np.load(tmp_path / "dedup" / "kept.npy"))
    written = json.loads((tmp_path / "ds_half" / "dataset.json").read_text())
    assert written["splits"] == {"train": 40, "val": 16}

    for method, extra in (("ssp", km), ("random", []), ("hierarchical", ["curate.levels=[8,2]", "curate.resampling_steps=2"])):
        run(*curate, f"curate={method}", "curate.keep_fraction=0.25", f"task.embeddings={emb}",
            *extra, f"hydra.run.dir={tmp_path}/{method}")
        assert summary(tmp_path / method)["num_kept"] == 20

    seeds = tmp_path / "seeds.txt"
    keys = (emb / "keys.txt").read_text().split()
    seeds.write_text("\n".join(keys[:3]))
    run(*curate, *km, "curate=retrieval", f"curate.seed_keys={seeds}", "curate.k=2", f"task.embeddings={emb}",
        f"hydra.run.dir={tmp_path}/retrieval")
    got = summary(tmp_path / "retrieval")["num_kept"]
    assert 2 <= got <= 6 and not set(keys[:3]) & set(_kept_keys(tmp_path / "retrieval"))

    run(*base, f"data.subset={tmp_path}/dbp", f"hydra.run.dir={tmp_path}/sub")
    assert "40 of 80 train samples (dbp)" in (tmp_path / "sub" / "run.log").read_text()
    assert 0.4 <= summary(tmp_path / "sub")["metrics"]["val/acc1"] <= 1  # chance 1/4, measured 0.75


def _kept_keys(run_dir) -> list[str]:
    return [r.split("\t")[0] for r in (run_dir / "subset.tsv").read_text().splitlines()[1:]]


def test_curate_refuses_embeddings_of_another_dataset(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=3, train=8, val=2)
    base = [*synthetic(tmp_path, images), "model.depth=1"]
    run(*base, f"data.root={tmp_path}/a", "task=embed", "task.features=thumbnail", "task.thumbnail_grid=2",
        f"task.out_dir={tmp_path}/emb", f"hydra.run.dir={tmp_path}/e")
    other = make_image_folder(tmp_path / "images2", classes=3, train=9, val=2)
    run(*synthetic(tmp_path, other), f"data.root={tmp_path}/b", "task=embed", "task.features=thumbnail",
        f"task.out_dir={tmp_path}/emb_b", f"hydra.run.dir={tmp_path}/e_b")
    proc = run(*synthetic(tmp_path, other), f"data.root={tmp_path}/b", "task=curate", "curate=random",
               f"task.embeddings={tmp_path}/emb", f"hydra.run.dir={tmp_path}/c", check=False)
    assert proc.returncode != 0 and "24 embeddings, but split 'train'" in proc.stderr + proc.stdout
