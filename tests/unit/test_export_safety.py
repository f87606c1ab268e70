"""task=convert export never overwrites files in task.seit_dir, and a failed export leaves nothing there (#63)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import write_token_dataset
from seit.data.seit_format import CODEBOOK_CKPT
from seit.pipelines.convert import convert

PREFIX = "imagenet1k"
FILES = sorted([CODEBOOK_CKPT, *(f"{PREFIX}-{split}-{tail}" for split in ("train", "val")
                                 for tail in ("token.data.bin.gz", "token.index.npy.gz", "label.txt"))])


def export(root, seit_dir) -> dict:
    return convert(OmegaConf.create({"data": {"root": str(root)}, "task": {
        "name": "convert", "direction": "export", "seit_dir": str(seit_dir), "prefix": PREFIX}}))


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def dataset(tmp_path):
    write_token_dataset(tmp_path / "ds", counts={"train": [12, 5], "val": [6]}, codebook_size=300)
    return tmp_path / "ds"


def test_export_writes_the_seit_files_and_nothing_else(dataset, tmp_path):
    export(dataset, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == FILES  # no temp dir left


def test_export_refuses_a_dir_holding_a_seit_set(dataset, tmp_path):
    out = tmp_path / "out"
    export(dataset, out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    write_token_dataset(tmp_path / "other", counts={"train": [4], "val": [3]}, codebook_size=300, seed=1)
    with pytest.raises(FileExistsError, match=r"already holds codebook.ckpt, imagenet1k-train-token.data.bin.gz.*"
                                              r"never overwrites") as e:
        export(tmp_path / "other", out)
    assert "\n" not in str(e.value)
    assert snapshot(out) == before


def test_export_refuses_any_single_file_it_would_write(dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{PREFIX}-val-label.txt").write_text("0\n1\n")
    with pytest.raises(FileExistsError, match=rf"task.seit_dir={out} already holds {PREFIX}-val-label.txt: "):
        export(dataset, out)
    assert snapshot(out) == {f"{PREFIX}-val-label.txt": b"0\n1\n"}


def test_a_damaged_shard_leaves_nothing_behind(dataset, tmp_path):
    """The val shard is read after the codebook and the train split are written: all of it must go."""
    shard = dataset / "shards" / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="val-000000.tar"):
        export(dataset, kept)
    assert snapshot(kept) == {"notes.txt": b"mine"} and [p.name for p in kept.iterdir()] == ["notes.txt"]
    with pytest.raises(Exception, match="val-000000.tar"):
        export(dataset, tmp_path / "new")
    assert not (tmp_path / "new").exists()
