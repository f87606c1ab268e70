"""task=embed on a damaged shard fails with its resumable state kept and no finished-looking output (#63)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_token_dataset
from seit.curation.embed import META, PROGRESS, embed_split, open_embeddings
from seit.data import shard_reader
from seit.data.dataset_info import DatasetError, TokenDatasetInfo


def test_embed_resumes_after_the_damaged_shard_is_restored(tmp_path):
    write_token_dataset(tmp_path / "ds", counts={"train": [10, 10, 10]}, codebook_size=300)
    info = TokenDatasetInfo.open(tmp_path / "ds")
    whole = embed_split(info, "train", None, tmp_path / "whole", features="thumbnail", thumbnail_grid=2)
    shard = tmp_path / "ds" / "shards" / "train-000001.tar"
    good = shard.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 3] ^= 0xFF
    shard.write_bytes(bytes(bad))
    shard_reader._VERIFIED.clear()

    out = tmp_path / "emb"
    with pytest.raises(DatasetError, match="train-000001.tar"):
        embed_split(info, "train", None, out, features="thumbnail", thumbnail_grid=2)
    assert not (out / META).exists()  # nothing reads the store as finished
    assert sorted(p.name for p in (out / PROGRESS).glob("train-*.json")) == ["train-000000.tar.json"]
    with pytest.raises(DatasetError, match="no finished embeddings"):
        open_embeddings(out)

    shard.write_bytes(good)
    shard_reader._VERIFIED.clear()
    resumed = embed_split(info, "train", None, out, features="thumbnail", thumbnail_grid=2)
    np.testing.assert_array_equal(np.asarray(resumed.vectors), np.asarray(whole.vectors))
    assert resumed.keys == whole.keys
