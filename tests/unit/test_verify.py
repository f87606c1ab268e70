"""task=verify: the scrub names every bad shard and chunk, and repair from parity is byte-exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import write_token_dataset
from seit.data import shard_reader
from seit.data.dataset_info import INFO_FILE, SHARD_DIR, DatasetError, seal
from seit.data.parity import parity_path_for, write_parity
from seit.pipelines.verify import verify

BLOCK = 512


def _cfg(root: Path, out: Path, repair: bool = False):
    return OmegaConf.create({"data": {"root": str(root)}, "paths": {"output_dir": str(out)}, "repair": repair})


def _dataset(root: Path, parity: float = 0.0) -> dict:
    meta = write_token_dataset(root, counts={"train": [40, 24], "val": [20]}, chunk_size=8)
    if parity:
        for shard in meta["shards"]:
            shard["parity"] = write_parity(root / SHARD_DIR / shard["name"], parity_path_for(root, shard["name"]), parity)
        meta["meta_sha256"] = seal(meta)
        (root / INFO_FILE).write_text(json.dumps(meta))
    return meta


def _flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    shard_reader._VERIFIED.clear()


def test_an_intact_dataset_verifies(tmp_path):
    _dataset(tmp_path / "ds")
    summary = verify(_cfg(tmp_path / "ds", tmp_path / "out"))
    assert summary["shards"] == 3 and summary["samples"] == 84 and not summary["faults"]
    table = (tmp_path / "out" / "verify.md").read_text()
    assert table.count("| ok |") == 3


def test_faults_name_the_shard_and_chunk(tmp_path):
    root = tmp_path / "ds"
    _dataset(root)
    shard = root / SHARD_DIR / "train-000001.tar"
    first_size = int(shard.read_bytes()[124:136].rstrip(b"\0 ").decode(), 8)  # the 1st member's size field (octal)
    _flip(shard, 2 * BLOCK + -(-first_size // BLOCK) * BLOCK + 40)  # inside chunk 1's payload (the 2nd member)
    (root / SHARD_DIR / "val-000001.tar").write_bytes(b"\0" * 1024)  # a stray file
    with pytest.raises(DatasetError, match=r"fault\(s\) in 1 of 3 shards: train-000001.tar") as err:
        verify(_cfg(root, tmp_path / "out"))
    assert "not listed in dataset.json: ['val-000001.tar']" in str(err.value)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["bad_shards"] == ["train-000001.tar"]
    row = next(line for line in (tmp_path / "out" / "verify.md").read_text().splitlines() if "train-000001" in line)
    assert "sha256" in row and "chunk 1 (train-000001-00001.tokens)" in row


@pytest.mark.parametrize("damage", ["flip", "zero_chunk", "truncate", "delete_member_header"])
def test_repair_from_parity_gives_byte_identical_shards(tmp_path, damage):
    root = tmp_path / "ds"
    _dataset(root, parity=0.25)
    shard = root / SHARD_DIR / "train-000000.tar"
    clean = shard.read_bytes()
    data = bytearray(clean)
    if damage == "flip":
        data[BLOCK + 77] ^= 0xFF
    elif damage == "zero_chunk":
        data[BLOCK : 2 * BLOCK] = bytes(BLOCK)
    elif damage == "delete_member_header":
        data[0:BLOCK] = bytes(BLOCK)
    else:
        data = data[: len(data) - 3 * BLOCK]
    shard.write_bytes(bytes(data))
    shard_reader._VERIFIED.clear()
    with pytest.raises(DatasetError, match="train-000000.tar"):
        verify(_cfg(root, tmp_path / "scrub"))
    summary = verify(_cfg(root, tmp_path / "repair", repair=True))
    assert shard.read_bytes() == clean
    assert summary["repaired"] == {"train-000000.tar": "parity"} and not summary["faults"]


def test_a_damaged_parity_file_is_reported_and_rewritten(tmp_path):
    root = tmp_path / "ds"
    _dataset(root, parity=0.1)
    par = parity_path_for(root, "val-000000.tar")
    clean = par.read_bytes()
    par.write_bytes(clean[: len(clean) // 2])
    with pytest.raises(DatasetError, match="val-000000.tar"):
        verify(_cfg(root, tmp_path / "scrub"))
    verify(_cfg(root, tmp_path / "repair", repair=True))
    assert par.read_bytes() == clean


def test_damage_beyond_parity_and_without_source_is_still_a_fault(tmp_path):
    root = tmp_path / "ds"
    _dataset(root, parity=0.05)
    shard = root / SHARD_DIR / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:BLOCK])
    with pytest.raises(DatasetError):
        verify(_cfg(root, tmp_path / "repair", repair=True))
    assert len(shard.read_bytes()) == BLOCK  # left as it was: nothing was half-written over it


def _tokenized(tmp_path: Path, **build) -> tuple[Path, dict]:
    from conftest import make_image_folder, tokenize_config
    from seit.pipelines.tokenize import tokenize

    images = make_image_folder(tmp_path / "images", classes=2, train=10, val=3, size=16)
    root = tmp_path / "ds"
    return root, tokenize(tokenize_config(images, root, storage_report=False, **build))


def test_tokenize_writes_parity_that_verify_repairs_from(tmp_path):
    root, meta = _tokenized(tmp_path, parity=0.5)
    assert all(s["parity"]["fraction"] == 0.5 for s in meta["shards"])
    assert meta["bytes_on_disk"] > sum(s["bytes"] + s["parity"]["bytes"] for s in meta["shards"])  # counted
    shard = root / SHARD_DIR / meta["shards"][1]["name"]
    clean = shard.read_bytes()
    shard.write_bytes(clean[: len(clean) // 2])  # half of it lost
    summary = verify(_cfg(root, tmp_path / "repair", repair=True))
    assert shard.read_bytes() == clean and summary["repaired"] == {shard.name: "parity"}


def test_repair_without_parity_rebuilds_from_the_source_images(tmp_path):
    root, meta = _tokenized(tmp_path)
    shard = root / SHARD_DIR / meta["shards"][0]["name"]
    clean = shard.read_bytes()
    shard.unlink()
    with pytest.raises(DatasetError, match=f"{shard.name} is missing"):
        verify(_cfg(root, tmp_path / "scrub"))
    summary = verify(_cfg(root, tmp_path / "repair", repair=True))
    assert shard.read_bytes() == clean and summary["repaired"] == {shard.name: "source"}


def test_swapped_shards_are_named_and_renamed_back(tmp_path):
    root = tmp_path / "ds"
    _dataset(root)
    a, b = root / SHARD_DIR / "train-000000.tar", root / SHARD_DIR / "train-000001.tar"
    clean_a, clean_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(clean_b), b.write_bytes(clean_a)
    shard_reader._VERIFIED.clear()
    with pytest.raises(DatasetError, match="train-000000.tar, train-000001.tar"):
        verify(_cfg(root, tmp_path / "scrub"))
    row = next(line for line in (tmp_path / "scrub" / "verify.md").read_text().splitlines() if "train-000000" in line)
    assert "holds exactly what dataset.json records for train-000001.tar" in row
    summary = verify(_cfg(root, tmp_path / "repair", repair=True))  # no parity, no source: a rename is enough
    assert a.read_bytes() == clean_a and b.read_bytes() == clean_b
    assert summary["repaired"] == {"train-000000.tar": "a rename", "train-000001.tar": "a rename"}


def test_a_damaged_codebook_and_synonym_table_are_rewritten(tmp_path):
    root, meta = _tokenized(tmp_path)
    codebook, table = root / "codebook.safetensors", root / "synonyms.safetensors"
    clean_codebook, clean_table = codebook.read_bytes(), table.read_bytes()
    damaged = bytearray(clean_table)
    damaged[-8] ^= 1  # a synonym id that stays < K: only the recorded sha256 tells
    table.write_bytes(bytes(damaged))
    codebook.write_bytes(clean_codebook[:100])
    with pytest.raises(DatasetError, match="tries to rebuild codebook.safetensors, synonyms.safetensors"):
        verify(_cfg(root, tmp_path / "scrub"))
    summary = verify(_cfg(root, tmp_path / "repair", repair=True))
    assert codebook.read_bytes() == clean_codebook and table.read_bytes() == clean_table
    assert summary["repaired"] == {"codebook.safetensors": "rewritten", "synonyms.safetensors": "rewritten"}


def test_what_repair_cannot_rebuild_gets_no_false_advice(tmp_path):
    root, meta = _tokenized(tmp_path)
    (root / "codec_model.safetensors").unlink()
    with pytest.raises(DatasetError, match="codec_model.safetensors is missing .*restore it from a backup") as err:
        verify(_cfg(root, tmp_path / "scrub"))
    assert "repair=true" not in str(err.value)
    info = json.loads((root / INFO_FILE).read_text())
    info["shards"][0]["count"] += 1
    (root / INFO_FILE).write_text(json.dumps(info))
    for repair in (False, True):  # nothing is rebuilt against values that cannot be trusted, and no advice says so
        with pytest.raises(DatasetError, match="dataset.json does not match its own checksum") as err:
            verify(_cfg(root, tmp_path / f"scrub{repair}", repair=repair))
        assert "repair=true" not in str(err.value) and not json.loads((tmp_path / f"scrub{repair}" / "summary.json").read_text())["repaired"]


def test_parity_added_to_a_finished_dataset_repairs_it(tmp_path):
    root = tmp_path / "ds"
    _dataset(root)
    cfg = _cfg(root, tmp_path / "add")
    cfg.parity = 0.3
    assert verify(cfg)["parity_written"] == 3
    meta = json.loads((root / INFO_FILE).read_text())
    assert all(s["parity"]["fraction"] == 0.3 for s in meta["shards"])
    shard = root / SHARD_DIR / "val-000000.tar"
    clean = shard.read_bytes()
    shard.write_bytes(clean[: len(clean) - 2 * BLOCK])
    assert verify(_cfg(root, tmp_path / "repair", repair=True))["repaired"] == {"val-000000.tar": "parity"}
    assert shard.read_bytes() == clean


def test_parity_added_to_a_dataset_from_before_the_rename_writes_codebook_dim(tmp_path):
    root = tmp_path / "ds"
    meta = _dataset(root)
    legacy = {("embed_dim" if k == "codebook_dim" else k): v for k, v in meta.items()}
    legacy["build"] = {"shard_size": 40, "tokenizer": {"kind": "patch_kmeans", "embed_dim": 4, "seed": 0}}
    (root / INFO_FILE).write_text(json.dumps(legacy))
    cfg = _cfg(root, tmp_path / "add")
    cfg.parity = 0.3
    assert verify(cfg)["parity_written"] == 3
    meta = json.loads((root / INFO_FILE).read_text())
    assert meta["codebook_dim"] == 4 and "embed_dim" not in meta
    assert meta["build"]["tokenizer"] == {"kind": "patch_kmeans", "codebook_dim": 4, "seed": 0}
    assert meta["build"]["parity"] == 0.3 and meta["meta_sha256"] == seal(meta)
    assert not verify(_cfg(root, tmp_path / "again"))["faults"]
