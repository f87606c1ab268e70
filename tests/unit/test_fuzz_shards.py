"""Flip one bit at every byte of a shard: every reader returns exactly the original samples or
raises a named error, never fewer or altered samples silently. Twice: with dataset.json's
sha256 (what every reader checks), and without it (the structural checks alone must hold too)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_token_dataset
from seit.data import shard_reader
from seit.data.dataset_info import INFO_FILE, DatasetError, TokenDatasetInfo, seal
from seit.data.shard_reader import read_rows, read_split
from seit.data.token_stream import TokenStream


def _readers(info):
    def val_stream():
        stream = TokenStream(info.shard_specs("val"), codec=info.codec, batch_size=7, train=False)
        batches = list(stream)
        return (np.concatenate([b["ids"].numpy() for b in batches]), np.concatenate([b["label"].numpy() for b in batches]),
                [k for b in batches for k in b["key"]])

    def train_stream():
        stream = TokenStream(info.shard_specs("val"), codec=info.codec, batch_size=5, train=True, shuffle_buffer=4)
        batches = list(stream)
        return np.concatenate([b["ids"].numpy() for b in batches]), np.concatenate([b["label"].numpy() for b in batches])

    return {"read_split": lambda: read_split(info, "val")[:2], "by_key": lambda: read_split(info, "val", by_key=True)[:2],
            "rows": lambda: read_rows(info, "val", np.arange(info.num_samples("val"))),
            "val_stream": val_stream, "train_stream": train_stream}


@pytest.mark.parametrize("checksums", [True, False], ids=["sha256", "structure-only"])
def test_every_bit_flip_is_caught_or_harmless(tmp_path, checksums):
    write_token_dataset(tmp_path, counts={"val": [24]}, grid=(4, 4), codebook_size=16, chunk_size=8)
    if not checksums:
        meta = json.loads((tmp_path / INFO_FILE).read_text())
        for s in meta["shards"]:
            s.pop("sha256"), s.pop("bytes")
        meta["meta_sha256"] = seal(meta)
        (tmp_path / INFO_FILE).write_text(json.dumps(meta))
    info = TokenDatasetInfo.open(tmp_path)
    readers = _readers(info)
    original = {name: read() for name, read in readers.items()}
    rows = {(ids.tobytes(), int(y)) for ids, y in zip(*original["val_stream"][:2])}
    path = Path(info.shard_specs("val")[0].path)
    clean = path.read_bytes()
    silent = []
    for pos in range(len(clean)):
        damaged = bytearray(clean)
        damaged[pos] ^= 1 << (pos % 8)
        path.write_bytes(bytes(damaged))
        shard_reader._VERIFIED.clear()
        for name, read in readers.items():
            try:
                got = read()
            except DatasetError as exc:
                assert "val-000000.tar" in str(exc)  # named
                continue
            if name == "train_stream":  # resampled: every sample must be an original one, unaltered
                ok = all((ids.tobytes(), int(y)) in rows for ids, y in zip(*got))
            else:
                ok = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, original[name]))
            if not ok:
                silent.append((pos, name))
    path.write_bytes(clean)
    assert not silent, f"{len(silent)} silent changes, e.g. {silent[:5]}"
