"""Shard parity: damage (zeroed chunk, flipped bytes, truncated tail, deleted file, damaged parity) is repaired
to a byte-identical shard; too much damage raises ParityError and leaves the shard untouched."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("zfec")

from seit.data.parity import (MAGIC, ParityError, check_parity, layout, parity_bytes, parity_path_for,  # noqa: E402
                              repair_shard, write_parity)
from seit.data.shard_writer import write_shard  # noqa: E402


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    """A real token shard of 24 chunks (about 40 KB)."""
    rng = np.random.default_rng(0)
    n = 384
    ids = rng.integers(0, 300, (n, 8, 8)).astype(np.uint16)
    labels = rng.integers(0, 5, n).astype(np.int64)
    path = tmp_path / "shards" / "train-000000.tar"
    write_shard(path, ids, labels, [f"k{i}" for i in range(n)], split="train", codec="zstd-planes",
                codebook_size=300, chunk_size=16)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _patch(path: Path, offset: int, data: bytes) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset:offset + len(data)] = data
    path.write_bytes(bytes(blob))


def _parity(shard: Path, fraction: float, **kw) -> tuple[Path, dict]:
    par = parity_path_for(shard.parent.parent, shard.name)
    return par, write_parity(shard, par, fraction, **kw)


def test_record_and_determinism(shard: Path, tmp_path: Path):
    par, rec = _parity(shard, 0.05)
    assert par == tmp_path / "parity" / "train-000000.tar.par"
    blob = par.read_bytes()
    assert rec["file"] == par.name and rec["bytes"] == len(blob) and rec["sha256"] == hashlib.sha256(blob).hexdigest()
    assert rec["fraction"] == 0.05 and rec["m"] >= 2 and rec["k"] > 1
    assert rec["bytes"] < 0.12 * shard.stat().st_size  # 5% + one spare block + the header
    again = write_parity(shard, tmp_path / "again.par", 0.05)
    assert (tmp_path / "again.par").read_bytes() == blob and again["sha256"] == rec["sha256"]
    c = check_parity(shard, par, expected_sha256=_sha(shard))
    assert c.header_ok and c.shard_ok and c.problem is None
    r = repair_shard(shard, par)
    assert not r.repaired and r.sha256 == _sha(shard)


def test_zeroed_chunk_is_repaired(shard: Path):
    original = shard.read_bytes()
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[5]
    assert member.size < 0.1 * len(original)
    par, _ = _parity(shard, 0.1)
    _patch(shard, member.offset, b"\0" * (member.offset_data + member.size - member.offset))
    c = check_parity(shard, par)
    assert not c.shard_ok and c.repairable and c.bad_data_blocks > 0
    r = repair_shard(shard, par, expected_sha256=hashlib.sha256(original).hexdigest())
    assert r.repaired and shard.read_bytes() == original


def test_flipped_bytes_are_repaired(shard: Path):
    original = shard.read_bytes()
    par, rec = _parity(shard, 0.1)
    rng = np.random.default_rng(1)
    block = rec["block_size"]
    for b in rng.choice(rec["k"], rec["m"], replace=False):  # one flipped byte in each of m blocks
        off = int(b) * block + int(rng.integers(0, min(block, len(original) - int(b) * block)))
        _patch(shard, off, bytes([original[off] ^ 0xFF]))
    assert check_parity(shard, par).bad_data_blocks == rec["m"]
    assert repair_shard(shard, par).repaired and shard.read_bytes() == original


def test_truncated_tail_is_repaired(shard: Path):
    original = shard.read_bytes()
    par, _ = _parity(shard, 0.05)
    shard.write_bytes(original[:len(original) - int(0.05 * len(original))])
    assert repair_shard(shard, par).repaired and shard.read_bytes() == original


def test_unaligned_run_of_fraction_is_repaired(shard: Path):
    """A contiguous run of `fraction` of the bytes starting mid-block touches m blocks: still repairable."""
    original = shard.read_bytes()
    par, rec = _parity(shard, 0.05)
    start, length = rec["block_size"] // 2 + 1, int(0.05 * len(original))
    _patch(shard, start, bytes(b ^ 0x55 for b in original[start:start + length]))
    assert repair_shard(shard, par).repaired and shard.read_bytes() == original


def test_too_much_damage_raises_and_leaves_the_shard(shard: Path):
    original = shard.read_bytes()
    par, rec = _parity(shard, 0.05)
    damaged = original[:len(original) // 2] + b"\x01" * (len(original) - len(original) // 2)
    shard.write_bytes(damaged)
    c = check_parity(shard, par)
    assert not c.repairable and c.bad_data_blocks > rec["m"]
    with pytest.raises(ParityError, match=r"train-000000\.tar.*data blocks bad.*not repairable") as e:
        repair_shard(shard, par)
    assert "\n" not in str(e.value)
    assert shard.read_bytes() == damaged


def test_deleted_shard(shard: Path, tmp_path: Path):
    original = shard.read_bytes()
    par, _ = _parity(shard, 0.1)
    full = write_parity(shard, tmp_path / "full.par", 1.0)  # fraction 1: the parity alone rebuilds the shard
    assert full["m"] > full["k"]
    shard.unlink()
    with pytest.raises(ParityError, match="missing"):
        repair_shard(shard, par)
    assert not shard.exists()
    assert repair_shard(shard, tmp_path / "full.par").repaired and shard.read_bytes() == original


def test_damaged_parity_still_repairs(shard: Path):
    original = shard.read_bytes()
    par, rec = _parity(shard, 0.1)
    blob = bytearray(par.read_bytes())
    blob[20] ^= 0xFF  # the front header copy: the back copy is used
    head = len(blob) - rec["m"] * rec["block_size"]
    assert head % 2 == 0
    blob[head // 2 + 3] ^= 0xFF  # the first parity block
    par.write_bytes(bytes(blob))
    _patch(shard, 100, b"\xAA" * 10)
    c = check_parity(shard, par)
    assert c.header_ok and c.bad_parity_blocks == 1 and c.bad_data_blocks == 1 and c.repairable
    assert repair_shard(shard, par).repaired and shard.read_bytes() == original
    # both header copies damaged: the parity is unusable
    blob[-5] ^= 0xFF
    par.write_bytes(bytes(blob))
    _patch(shard, 100, b"\xAA" * 10)
    with pytest.raises(ParityError, match="no intact header"):
        repair_shard(shard, par)
    # a truncated parity file keeps its front header; parity blocks past the end count as bad
    intact = parity_bytes(original, rec["fraction"], rec["block_size"])[0]
    par.write_bytes(intact[:head // 2 + rec["block_size"] * (rec["m"] - 1)])
    assert check_parity(shard, par).bad_parity_blocks == 1
    assert repair_shard(shard, par).repaired and shard.read_bytes() == original


def test_stale_or_missing_parity(shard: Path, tmp_path: Path):
    par, _ = _parity(shard, 0.05)
    with pytest.raises(ParityError, match="another version"):
        repair_shard(shard, par, expected_sha256="0" * 64)
    with pytest.raises(ParityError, match="missing"):
        repair_shard(shard, tmp_path / "nope.par")
    assert MAGIC in par.read_bytes()[:8]


def test_layout_limits():
    assert layout(10, 0.05) == (10, 1, 2)
    block, k, m = layout(4 << 20, 0.1)
    assert k + m <= 256 and block * k >= 4 << 20
    with pytest.raises(ValueError, match="block_size >="):
        layout(4 << 20, 0.1, block_size=4096)
    with pytest.raises(ValueError, match="fraction"):
        layout(1000, 0.0)


def test_appended_bytes_and_damaged_parity_of_an_intact_shard(shard: Path):
    original = shard.read_bytes()
    par, rec = _parity(shard, 0.05)
    shard.write_bytes(original + b"junk" * 100)  # a shard that grew: cut back to its size
    assert repair_shard(shard, par).repaired and shard.read_bytes() == original
    blob = bytearray(par.read_bytes())
    blob[len(blob) // 2] ^= 1  # inside a parity block
    par.write_bytes(bytes(blob))
    c = check_parity(shard, par)
    assert c.shard_ok and c.bad_parity_blocks == 1 and "rewrite the parity" in c.problem
    r = repair_shard(shard, par)
    assert not r.repaired and r.bad_parity_blocks == 1 and shard.read_bytes() == original
