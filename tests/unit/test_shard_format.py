import tarfile

import numpy as np
import pytest

from seit.data.chunk import Chunk, decode_chunk, encode_chunk
from seit.data.codec import CodecError
from seit.data.shard_writer import write_shard


def _sample(n, k=600, grid=(4, 5)):
    rng = np.random.default_rng(n)
    return (rng.integers(0, k, (n, *grid)).astype(np.uint16), rng.integers(-1, 10, n),
            [f"dir/img_{i}" for i in range(n)])


@pytest.mark.parametrize("n,chunk_size,chunks", [(100, 32, 4), (96, 32, 3), (32, 32, 1), (1, 32, 1), (33, 32, 2)])
def test_shard_round_trip_across_chunk_boundaries(tmp_path, n, chunk_size, chunks):
    ids, labels, keys = _sample(n)
    rec = write_shard(tmp_path / "train-000000.tar", ids, labels, keys, split="train", codec="zstd-planes",
                      codebook_size=600, chunk_size=chunk_size)
    assert rec.count == n and rec.bytes == (tmp_path / "train-000000.tar").stat().st_size
    with tarfile.open(tmp_path / "train-000000.tar") as tar:  # a standard tar any tool can list
        members = tar.getmembers()
        assert len(members) == chunks
        decoded = [decode_chunk(tar.extractfile(m).read(), "zstd-planes") for m in members]
    assert [len(c) for c in decoded][:-1] == [chunk_size] * (chunks - 1)
    np.testing.assert_array_equal(np.concatenate([c.ids for c in decoded]), ids)
    np.testing.assert_array_equal(np.concatenate([c.labels for c in decoded]), labels)
    assert sum((c.keys for c in decoded), []) == keys


def test_shard_bytes_are_deterministic(tmp_path):
    ids, labels, keys = _sample(50)
    a, b = (write_shard(tmp_path / d / "t-000000.tar", ids, labels, keys, split="t", codec="zstd-planes",
                        codebook_size=600, chunk_size=16) for d in ("a", "b"))
    assert a.sha256 == b.sha256
    assert (tmp_path / "a" / "t-000000.tar").read_bytes() == (tmp_path / "b" / "t-000000.tar").read_bytes()


def test_tar_overhead_is_small(tmp_path):
    """No 10 KiB record padding: per-sample container overhead stays a few bytes."""
    ids, labels, keys = _sample(256)
    rec = write_shard(tmp_path / "s.tar", ids, labels, keys, split="t", codec="zstd-planes", codebook_size=600, chunk_size=256)
    payload = encode_chunk(Chunk(ids, labels, keys), "zstd-planes", 600)
    assert rec.bytes - len(payload) <= 512 + 511 + 1024


def test_truncated_chunk_raises():
    ids, labels, keys = _sample(10)
    payload = encode_chunk(Chunk(ids, labels, keys), "zstd-planes", 600)
    with pytest.raises(CodecError, match="truncated|header"):
        decode_chunk(payload[:-5], "zstd-planes")


def test_bad_keys_refused():
    ids, labels, _ = _sample(2)
    with pytest.raises(ValueError, match="single-line"):
        encode_chunk(Chunk(ids, labels, ["a\nb", "c"]), "zstd-planes", 600)
