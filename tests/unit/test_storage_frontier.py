"""experiments/storage_frontier.py: the data-variant builders and byte accounting, on a few synthetic images."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, make_image_folder, write_token_dataset

sys.path.insert(0, str(REPO / "experiments"))
import storage_frontier as sf  # noqa: E402


@pytest.fixture
def jpegs(tmp_path: Path) -> Path:
    # 3 classes x 6 train / 2 val, 32 px noisy colour JPEGs (quality 75, Pillow's default)
    return make_image_folder(tmp_path / "src", classes=3, train=6, val=2, size=32, fmt="JPEG")


def test_reencode_keeps_every_image_and_lower_quality_costs_fewer_bytes(jpegs, tmp_path):
    hi = sf.build_reencoded(jpegs, tmp_path / "q95", 95)
    lo = sf.build_reencoded(jpegs, tmp_path / "q10", 10)
    for split, n in (("train", 18), ("val", 6)):
        files = sf.list_images(tmp_path / "q10", split)
        assert len(files) == n
        assert [c for c, _ in files] == [c for c, _ in sf.list_images(jpegs, split)]  # same classes, same order
        assert lo["splits"][split] == {"images": n, "bytes": sf.split_bytes(tmp_path / "q10", split)[1]}
    assert lo["splits"]["train"]["bytes"] < hi["splits"]["train"]["bytes"]
    with Image.open(sf.list_images(tmp_path / "q10", "val")[0][1]) as img:
        assert (img.format, img.size) == ("JPEG", (32, 32))
    assert not (tmp_path / "q10.tmp").exists()


def test_downsampled_variant_has_the_stored_size(jpegs, tmp_path):
    sf.build_reencoded(jpegs, tmp_path / "r8", 95, size=8)
    for split in sf.SPLITS:
        for _, f in sf.list_images(tmp_path / "r8", split):
            with Image.open(f) as img:
                assert img.size == (8, 8)


def test_a_finished_variant_is_not_rebuilt(jpegs, tmp_path):
    first = sf.build_reencoded(jpegs, tmp_path / "q50", 50)
    victim = sf.list_images(tmp_path / "q50", "train")[0][1]
    victim.write_bytes(b"marker")  # a rebuild would overwrite it
    assert sf.build_reencoded(jpegs, tmp_path / "q50", 50) == first
    assert victim.read_bytes() == b"marker"


def test_stratified_subset_fits_the_budget_and_balances_classes(jpegs):
    files = sf.list_images(jpegs, "train")
    sizes = {f: f.stat().st_size for _, f in files}
    budget = sum(sizes.values()) // 2
    picked = sf.stratified_subset(files, budget, seed=0)
    assert sum(sizes[f] for _, f in picked) <= budget
    counts = Counter(c for c, _ in picked)
    assert len(counts) == 3 and max(counts.values()) - min(counts.values()) <= 1
    # close to the budget: one more file of any class would not fit, or the classes are used up
    assert budget - sum(sizes[f] for _, f in picked) < max(sizes.values())
    assert sf.stratified_subset(files, budget, seed=0) == picked
    assert sf.stratified_subset(files, budget, seed=1) != picked
    assert sorted(sf.stratified_subset(files, 10**9)) == sorted(files)  # everything fits
    with pytest.raises(ValueError, match="one image of each"):
        sf.stratified_subset(files, min(sizes.values()))


def test_subset_copies_files_byte_identical_and_keeps_val(jpegs, tmp_path):
    total = sf.split_bytes(jpegs, "train")[1]
    rec = sf.build_subset(jpegs, tmp_path / "sub", total // 3)
    n, b = sf.split_bytes(tmp_path / "sub", "train")
    assert rec["splits"]["train"] == {"images": n, "bytes": b} and b <= total // 3 and 3 <= n < 18
    assert rec["splits"]["val"]["images"] == 6
    for cls, f in sf.list_images(tmp_path / "sub", "train"):
        assert f.read_bytes() == (jpegs / "train" / cls / f.name).read_bytes()
    # another budget rebuilds
    assert sf.build_subset(jpegs, tmp_path / "sub", total)["splits"]["train"]["images"] == 18


def test_token_bytes_count_train_shards_and_dataset_files_not_val(tmp_path):
    root = tmp_path / "tok"
    write_token_dataset(root, counts={"train": [20, 12], "val": [10]})
    n, total, shared = sf.token_train_bytes(root)
    shards = sorted((root / "shards").iterdir())
    train = sum(p.stat().st_size for p in shards if p.name.startswith("train-"))
    top = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
    assert (n, total, shared) == (32, train + top, top)
    with pytest.raises(FileNotFoundError, match="not built"):
        sf.token_train_bytes(tmp_path / "missing")


def test_subset_trains_the_same_steps_as_the_full_set():
    pt = sf.all_points()["subset_tok512"]
    ov = sf.overrides(pt, {"root": "/d", "n_train": 1013}, seed=0, epochs=6, lr=1e-3, tag="t", full_train=10000)
    # 6 x 78 = 468 full-set steps; 1013 images = 7 steps per epoch -> 67 epochs, warmup 1/6 of the steps
    assert "trainer.max_epochs=67" in ov and "trainer.check_val_every_n_epoch=67" in ov
    assert "scheduler.warmup_fraction=0.166667" in ov and "data.source=/d" in ov
    full = sf.overrides(sf.all_points()["jpeg_q75"], {"root": "/q", "n_train": 10000}, 0, 6, 1e-3, "t", 10000)
    assert "trainer.max_epochs=6" in full and not any(o.startswith("scheduler.") for o in full)


def test_report_reads_the_summaries_and_writes_table_csv_and_plot(jpegs, tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(sf, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sf, "DATA", tmp_path / "data")
    sf.build_reencoded(jpegs, sf.DATA / "jpeg_q50", 50)
    sf.build_reencoded(jpegs, sf.DATA / "res16", 95, size=16)
    for name, accs in (("jpeg_q50", (0.40, 0.44)), ("res16", (0.30,))):
        for seed, acc in enumerate(accs):
            d = sf.run_dir(name, seed, "t")
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps({"metrics": {"val/acc1": acc, "val/acc5": 0.9},
                                                        "global_step": 234, "wall_s": 10.0}))
    rows = sf.report(["jpeg_q50", "res16", "jpeg_q5"], [0, 1], "t", jpegs, 3, 1e-3)
    assert [r["point"] for r in rows] == ["jpeg_q50", "res16"]  # jpeg_q5 has no data: left out
    q50 = rows[0]
    assert q50["acc1_mean"] == pytest.approx(42.0) and (q50["acc1_min"], q50["acc1_max"]) == (40.0, 44.0)
    assert q50["train_bytes"] == sf.split_bytes(sf.DATA / "jpeg_q50", "train")[1] and q50["n_train"] == 18
    csv_lines = (sf.RESULTS / "frontier.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[1].startswith("res16")  # sorted by bytes: 16 px is smaller
    assert "| jpeg_q50 | jpeg q50 | 18 |" in (sf.RESULTS / "frontier.md").read_text()
    with Image.open(sf.RESULTS / "frontier.png") as img:
        assert img.format == "PNG"
