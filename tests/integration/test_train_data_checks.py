"""Training on a built dataset through run.py: a damaged shard read by DataLoader workers is one short
line naming it (#64); a dataset built from another source or with other settings is refused, as
task=tokenize refuses it, instead of trained on without a word (#42)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import make_image_folder, write_token_dataset
from run_helpers import paths, run, synthetic

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(folder, images, dataset root): a tiny dataset tokenized once for the module."""
    tmp = tmp_path_factory.mktemp("built")
    images = make_image_folder(tmp / "images", classes=3, train=10, val=3)
    run(*synthetic(tmp, images), "task=tokenize", f"data.root={tmp}/ds")
    return tmp, images, tmp / "ds"


def train(tmp_path, images, root, *extra):
    return run(*synthetic(tmp_path, images), f"data.root={root}", *extra, check=False)


def refusal(proc) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_a_damaged_shard_read_by_workers_is_one_short_line(tmp_path, built):
    _, images, ds = built
    root = tmp_path / "ds"
    shutil.copytree(ds, root)
    shutil.copy(f"{ds}.tokenizer.safetensors", f"{root}.tokenizer.safetensors")
    shard = root / "shards" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 1
    shard.write_bytes(bytes(data))
    line = refusal(train(tmp_path, images, root, "data.num_workers=2"))
    assert line.startswith(f"error: shard {shard} has sha256 "), line
    assert "(in DataLoader worker process" in line and line.count("scrub the dataset") == 1 and len(line) < 400


def test_a_dataset_built_from_another_source_is_refused(tmp_path, built):
    tmp, images, ds = built
    other = tmp / "other"
    other.mkdir(exist_ok=True)
    line = refusal(train(tmp_path, images, ds, f"data.build.source={other}"))
    assert line.startswith(f"error: {ds} is a finished token dataset built with other settings: "), line
    assert f"data.build.source={other} (built with " in line
    assert not (tmp_path / "run" / "summary.json").exists()


def test_the_same_source_trains_whatever_the_other_build_settings(tmp_path, built):
    """Shard and chunk sizes, or a quicker tokenizer fit (debug=fast), do not change which images it trains on."""
    _, images, ds = built
    train_proc = train(tmp_path, images, ds, "data.build.chunk_size=8", "tokenizer.fit_iters=2")
    assert train_proc.returncode == 0, train_proc.stderr[-3000:]
    assert "val/acc1" in json.loads((tmp_path / "run" / "summary.json").read_text())


def test_a_dataset_without_build_settings_trains_with_any_source(tmp_path):
    """Imported (task=convert) or hand-made datasets record no build settings: nothing to compare."""
    write_token_dataset(tmp_path / "ds", counts={"train": [16], "val": [8]}, codebook_size=64)
    proc = run(*paths(tmp_path), "data=tokens", f"data.root={tmp_path}/ds", f"data.build.source={tmp_path}",
               "debug=fast", "aug.crop=6", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
