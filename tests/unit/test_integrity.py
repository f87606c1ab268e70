"""The one shard reader: what dataset.json promises is checked on every path, and damage is named.

Each case is a fault users hit (issue 15): a truncated, emptied, unlisted or corrupted shard, a
damaged tar header mid-archive, ids beyond the codebook, labels beyond the class list, absurd
count fields, a validation split smaller than the ranks, a training split with nothing in it.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import write_token_dataset
from seit.data import shard_reader
from seit.data.dataset_info import INFO_FILE, SHARD_DIR, DatasetError, TokenDatasetInfo, seal
from seit.data.shard_reader import ShardReadError, read_shard, read_split
from seit.data.shard_writer import shard_bytes, write_shard
from seit.data.token_stream import TokenStream

BLOCK = 512


def _dataset(tmp_path, counts=None, **kw) -> TokenDatasetInfo:
    write_token_dataset(tmp_path, counts=counts or {"train": [40, 24], "val": [20, 12]}, chunk_size=8, **kw)
    return TokenDatasetInfo.open(tmp_path)


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def _val_keys(info, *, rank=0, world=1, workers=0):
    stream = TokenStream(info.shard_specs("val"), codec=info.codec, batch_size=8, train=False, rank=rank,
                         world_size=world, num_workers=workers)
    return _keys(DataLoader(stream, batch_size=None, num_workers=workers))


def _edit_meta(root: Path, fn, reseal: bool = True) -> None:
    """Edit dataset.json; resealed, as a deliberate edit would be, so that the check under test is the one reached."""
    meta = json.loads((root / INFO_FILE).read_text())
    fn(meta)
    if reseal:
        meta["meta_sha256"] = seal(meta)
    (root / INFO_FILE).write_text(json.dumps(meta))


def _unrecord_checksums(root: Path) -> None:
    """Drop sizes and checksums from dataset.json, so that only the structural checks stand."""
    _edit_meta(root, lambda m: [s.pop(k, None) for s in m["shards"] for k in ("sha256", "bytes")])


# -- the listing ------------------------------------------------------------------------------
def test_val_shard_truncated_at_a_member_boundary_is_refused(tmp_path):
    info = _dataset(tmp_path)
    shard = Path(info.shard_specs("val")[0].path)
    data = shard.read_bytes()
    shard.write_bytes(data[: BLOCK + 8 * BLOCK])  # cut after some whole members (no end marker)
    with pytest.raises(DatasetError, match="val-000000.tar has .* bytes, not the recorded"):
        TokenDatasetInfo.open(tmp_path)
    _unrecord_checksums(tmp_path)  # an older dataset.json without sizes: the reader still notices
    with pytest.raises(ShardReadError, match="val-000000.tar"):
        _val_keys(TokenDatasetInfo.open(tmp_path))


def test_val_shard_replaced_by_an_empty_tar_is_refused(tmp_path):
    info = _dataset(tmp_path)
    Path(info.shard_specs("val")[1].path).write_bytes(b"\0" * (2 * BLOCK))
    with pytest.raises(DatasetError, match="val-000001.tar has 1024 bytes"):
        TokenDatasetInfo.open(tmp_path)
    _unrecord_checksums(tmp_path)
    with pytest.raises(ShardReadError, match="val-000001.tar holds no chunk"):
        _val_keys(TokenDatasetInfo.open(tmp_path))


def test_dropping_a_shard_entry_from_dataset_json_is_refused(tmp_path):
    _dataset(tmp_path)
    _edit_meta(tmp_path, lambda m: m["shards"].pop())
    with pytest.raises(DatasetError, match="shard entries were removed") as err:
        TokenDatasetInfo.open(tmp_path)
    assert "not listed in dataset.json: ['val-000001.tar']" in str(err.value)


def test_a_hand_edited_dataset_json_is_refused(tmp_path):
    """A shard entry copied in from another dataset, or edited counts: dataset.json no longer matches its seal."""
    _dataset(tmp_path)
    _edit_meta(tmp_path, lambda m: m["shards"][0].update(sha256="0" * 64), reseal=False)
    with pytest.raises(DatasetError, match="does not match its own checksum"):
        TokenDatasetInfo.open(tmp_path)


def test_damaged_codebook_and_synonym_files_are_named(tmp_path):
    info = _dataset(tmp_path)
    codebook = tmp_path / "codebook.safetensors"
    data = bytearray(codebook.read_bytes())
    data[12] ^= 0x20  # inside the JSON header
    codebook.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="codebook.safetensors cannot be read .*the file is damaged"):
        info.load_codebook()
    from seit.data.dataset_info import save_synonyms

    save_synonyms(tmp_path / "synonyms.safetensors", torch.zeros(300, 3, dtype=torch.long))
    info.meta["synonyms_file"] = "synonyms.safetensors"
    info.meta["file_sha256"]["synonyms.safetensors"] = "0" * 64  # as if built with another table
    with pytest.raises(DatasetError, match="synonyms.safetensors has another sha256 than dataset.json records"):
        info.load_synonyms()


def test_an_unlisted_shard_file_is_reported(tmp_path):
    _dataset(tmp_path)
    (tmp_path / SHARD_DIR / "val-000002.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(DatasetError, match=r"1 shard file\(s\) not listed in dataset.json: \['val-000002.tar'\]"):
        TokenDatasetInfo.open(tmp_path)


def test_a_missing_shard_is_named(tmp_path):
    info = _dataset(tmp_path)
    Path(info.shard_specs("train")[1].path).unlink()
    with pytest.raises(DatasetError, match="shard train-000001.tar is missing"):
        TokenDatasetInfo.open(tmp_path)


# -- the shard's contents ---------------------------------------------------------------------
def test_a_corrupt_shard_fails_its_sha256(tmp_path):
    info = _dataset(tmp_path)
    spec = info.shard_specs("train")[0]
    data = bytearray(Path(spec.path).read_bytes())
    data[BLOCK + 100] ^= 1  # inside the first chunk's payload
    Path(spec.path).write_bytes(bytes(data))
    shard_reader._VERIFIED.clear()
    with pytest.raises(ShardReadError, match="train-000000.tar has sha256 .* the file is corrupt"):
        read_split(info, "train")


def test_a_damaged_tar_header_mid_archive_is_an_error_not_the_end(tmp_path):
    info = _dataset(tmp_path)
    _unrecord_checksums(tmp_path)
    info = TokenDatasetInfo.open(tmp_path)
    spec = info.shard_specs("train")[0]
    data = bytearray(Path(spec.path).read_bytes())
    second = BLOCK + -(-int(data[124:136].rstrip(b"\0 ").decode(), 8) // BLOCK) * BLOCK  # the 2nd member's header
    data[second + 3] ^= 0x20  # its name: the header checksum no longer matches
    Path(spec.path).write_bytes(bytes(data))
    with pytest.raises(ShardReadError, match=f"damaged tar header at byte {second}"):
        list(read_shard(spec, info.load_codec()))


def test_ids_beyond_the_codebook_are_refused_on_every_codec_and_path(tmp_path):
    """An id of 200 in a K=64 dataset: zstd-planes stores it without complaint, the reader must not."""
    from seit.data.shard_reader import read_rows

    info = _dataset(tmp_path, counts={"train": [16], "val": [8]}, codebook_size=64)
    ids = np.zeros((8, 8, 8), np.uint16)
    ids[5, 1, 2] = 200
    record = write_shard(tmp_path / SHARD_DIR / "val-000000.tar", ids, np.zeros(8, np.int64), [f"v{i}" for i in range(8)],
                         split="val", codec="zstd-planes", codebook_size=300, chunk_size=8)
    _edit_meta(tmp_path, lambda m: m["shards"][-1].update(sha256=record.sha256, bytes=record.bytes))
    info = TokenDatasetInfo.open(tmp_path)
    for read in (lambda: read_split(info, "val"), lambda: read_split(info, "val", by_key=True),
                 lambda: read_rows(info, "val", [5]), lambda: _val_keys(info)):
        with pytest.raises(ShardReadError, match="sample 'v5' has id 200 >= codebook size 64"):
            read()


def test_labels_outside_the_class_list_are_refused(tmp_path):
    _dataset(tmp_path, counts={"train": [16], "val": [8]}, num_classes=5)
    labels = np.array([0, 1, 2, 3, 4, 5, 0, 1])
    record = write_shard(tmp_path / SHARD_DIR / "val-000000.tar", np.zeros((8, 8, 8), np.uint16), labels,
                         [f"v{i}" for i in range(8)], split="val", codec="zstd-planes", codebook_size=300, chunk_size=8)
    _edit_meta(tmp_path, lambda m: m["shards"][-1].update(sha256=record.sha256, bytes=record.bytes))
    with pytest.raises(ShardReadError, match="sample 'v5' has label 5, outside the 5 classes"):
        read_split(TokenDatasetInfo.open(tmp_path), "val")


def test_an_absurd_count_field_is_refused_before_allocating(tmp_path):
    info = _dataset(tmp_path, counts={"train": [16], "val": [8]})
    _unrecord_checksums(tmp_path)
    info = TokenDatasetInfo.open(tmp_path)
    spec = info.shard_specs("val")[0]
    data = bytearray(Path(spec.path).read_bytes())
    chunk = BLOCK  # the first member's payload: the chunk header <4sIIII, then the ids' STOK header <4sBBHHI
    data[chunk + 4 : chunk + 8] = struct.pack("<I", 2**31)  # samples in the chunk
    Path(spec.path).write_bytes(bytes(data))
    with pytest.raises(ShardReadError, match="claims 2147483648 samples, dataset.json implies 8"):
        read_split(info, "val")
    data[chunk + 4 : chunk + 8] = struct.pack("<I", 8)
    data[chunk + 20 + 10 : chunk + 20 + 14] = struct.pack("<I", 2**30)  # the ids payload's own count
    Path(spec.path).write_bytes(bytes(data))
    with pytest.raises(ShardReadError, match=r"header claims ids of shape \[1073741824, 8, 8\], expected \[8, 8, 8\]"):
        read_split(info, "val")


def test_a_zstd_frame_claiming_terabytes_is_refused(tmp_path):
    """The keys stream of a chunk whose zstd frame header declares an absurd content size."""
    import zstandard

    from seit.data.chunk import _HEADER, decode_chunk
    from seit.data.codec import CodecError, encode_zstd_planes

    ids = encode_zstd_planes(np.zeros((2, 4, 4), np.uint16), 16)
    labels = zstandard.ZstdCompressor(write_checksum=True).compress(np.zeros(2, "<i4").tobytes())
    keys = zstandard.ZstdCompressor(write_checksum=True).compress(b"a" * (1 << 20))  # 1 MB for 2 keys
    payload = _HEADER.pack(b"SCHK", 2, len(ids), len(labels), len(keys)) + ids + labels + keys
    with pytest.raises(CodecError, match="keys: zstd frame declares 1048576 bytes, expected at most"):
        decode_chunk(payload, "zstd-planes", n=2, grid=(4, 4))


# -- streams: validation over ranks, training with nothing to read ------------------------------
def test_validation_of_one_chunk_on_two_ranks_gives_every_rank_a_batch(tmp_path):
    info = _dataset(tmp_path, counts={"train": [16], "val": [5]})
    per_rank = [_val_keys(info, rank=r, world=2, workers=2) for r in range(2)]
    assert all(per_rank)  # no rank is left without a batch (it would leave the other waiting forever)
    assert Counter(per_rank[0] + per_rank[1]) == Counter(f"val/0/{i}" for i in range(5))


def test_validation_chunks_are_dealt_to_every_rank(tmp_path):
    """2 chunks, 2 ranks x 2 workers: dealt by slot, rank 1 would get nothing."""
    info = _dataset(tmp_path, counts={"train": [16], "val": [12]})
    per_rank = [_val_keys(info, rank=r, world=2, workers=2) for r in range(2)]
    assert all(per_rank) and sorted(per_rank[0] + per_rank[1]) == sorted(f"val/0/{i}" for i in range(12))


def test_validation_with_fewer_samples_than_ranks_is_refused_at_setup(tmp_path):
    info = _dataset(tmp_path, counts={"train": [16], "val": [3]})
    with pytest.raises(DatasetError, match="has 3 samples, fewer than the 4 ranks"):
        TokenStream(info.shard_specs("val"), codec=info.codec, batch_size=8, train=False, rank=0, world_size=4)


def test_training_with_nothing_to_read_is_a_named_error(tmp_path):
    info = _dataset(tmp_path)
    keep = {s.path: np.zeros(s.count, bool) for s in info.shard_specs("train")}
    with pytest.raises(DatasetError, match="'train' split of 2 shard.* has no sample to train on"):
        TokenStream(info.shard_specs("train"), codec=info.codec, batch_size=8, train=True, keep=keep)


def test_an_intact_dataset_reads_exactly(tmp_path):
    info = _dataset(tmp_path)
    ids, labels, counts = read_split(info, "train")
    assert counts == [40, 24] and ids.shape == (64, 8, 8)
    assert sorted(_val_keys(info, world=1, workers=2)) == sorted([f"val/0/{i}" for i in range(20)]
                                                                + [f"val/1/{i}" for i in range(12)])


def test_the_split_readers_agree_and_read_rows_decodes_only_the_chunks_it_needs(tmp_path, monkeypatch):
    from seit.data import shard_reader
    from seit.data.shard_reader import read_rows, split_chunks

    info = _dataset(tmp_path)
    ids, labels, _ = read_split(info, "train")
    keys = [k for _, _, c in split_chunks(info, "train") for k in c.keys]
    by_key, by_key_labels, _ = read_split(info, "train", by_key=True)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    assert np.array_equal(by_key, ids[order]) and np.array_equal(by_key_labels, labels[order])
    rows = [41, 3, 41, 63]  # a position may repeat
    decoded = []
    real = shard_reader.decode_chunk
    monkeypatch.setattr(shard_reader, "decode_chunk", lambda *a, **k: decoded.append(1) or real(*a, **k))
    assert np.array_equal(read_rows(info, "train", rows), ids[rows])
    assert len(decoded) == 3  # the chunks holding 3, 41 and 63, of 8
    with pytest.raises(IndexError, match=r"rows must lie in \[0, 64\) for split 'train'"):
        read_rows(info, "train", [64])


def test_shard_bytes_round_trip_through_the_strict_parser():
    data = shard_bytes(np.ones((20, 4, 4), np.uint16), np.zeros(20, np.int64), [str(i) for i in range(20)],
                       stem="train-000000", codec="zstd-planes", codebook_size=16, chunk_size=8)
    names = [name for name, _ in shard_reader.tar_members(data, "x")]
    assert names == [f"train-000000-{i:05d}.tokens" for i in range(3)]
    with pytest.raises(ShardReadError, match="followed by data"):
        list(shard_reader.tar_members(data + b"\1" + b"\0" * 511, "x"))


def test_workers_whose_shards_are_empty_do_not_spin(tmp_path):
    """Shards recorded empty (every image skipped) are never drawn; the epoch ends on time."""
    info = _dataset(tmp_path, counts={"train": [0, 0, 0, 16], "val": [8]})
    assert [s.count for s in info.shard_specs("train")] == [0, 0, 0, 16]
    assert list(read_shard(info.shard_specs("train")[0], info.load_codec())) == []
    stream = TokenStream(info.shard_specs("train"), codec=info.codec, batch_size=4, train=True, num_workers=2)
    batches = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert len(batches) == len(stream) == 4


def test_embed_and_subset_writing_refuse_a_corrupt_shard(tmp_path):
    from seit.curation.embed import embed_split
    from seit.curation.manifest import read_subset, write_subset
    from seit.curation.subset_dataset import write_subset_dataset

    info = _dataset(tmp_path / "ds")
    keys = [k for spec in info.shard_specs("train") for c in read_shard(spec, info.load_codec()) for k in c.keys]
    write_subset(tmp_path / "subset", info, "train", keys, [0, 5, 50], method="test")
    val = Path(info.shard_specs("val")[1].path)
    data = bytearray(val.read_bytes())
    data[BLOCK + 30] ^= 2
    val.write_bytes(bytes(data))  # a shard of the split the subset copies as it is
    shard_reader._VERIFIED.clear()
    with pytest.raises(ShardReadError, match="val-000001.tar has sha256"):
        write_subset_dataset(info, read_subset(tmp_path / "subset"), tmp_path / "copy")
    with pytest.raises(ShardReadError, match="val-000001.tar has sha256"):
        embed_split(info, "val", None, tmp_path / "emb", features="thumbnail", thumbnail_grid=2)
