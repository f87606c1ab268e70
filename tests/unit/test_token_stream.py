import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from conftest import label_of, write_token_dataset
from seit.data.dataset_info import SHARD_DIR, TokenDatasetInfo
from seit.data.shard_writer import write_shard
from seit.data.token_stream import ShardReadError, TokenStream

COUNTS = {"train": [70, 45, 33], "val": [41, 29, 3]}  # uneven shards, fewer shards than rank x worker slots


def _stream(info, split, *, train, rank=0, world=1, workers=0, batch=8, seed=0):
    return TokenStream(info.shard_specs(split), codec=info.codec, batch_size=batch, train=train, rank=rank,
                       world_size=world, num_workers=workers, seed=seed,
                       shuffle_buffer=32)


def _iterate(stream, workers):
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


@pytest.fixture(scope="module")
def info(tmp_path_factory) -> TokenDatasetInfo:
    root = tmp_path_factory.mktemp("tokens")
    write_token_dataset(root, counts=COUNTS, chunk_size=8)
    return TokenDatasetInfo.open(root)


def test_val_sees_every_sample_once_over_2_ranks_x_2_workers(info):
    keys = []
    for rank in range(2):
        for batch in _iterate(_stream(info, "val", train=False, rank=rank, world=2, workers=2), workers=2):
            keys += batch["key"]
            assert batch["label"].tolist() == [label_of(k, 5) for k in batch["key"]]
    expected = {f"val/{s}/{i}" for s, n in enumerate(COUNTS["val"]) for i in range(n)}
    assert Counter(keys) == Counter(expected)  # all of them, none twice


def test_train_gives_equal_full_batches_per_rank(info):
    per_rank = []
    for rank in range(2):
        stream = _stream(info, "train", train=True, rank=rank, world=2, workers=2)
        batches = _iterate(stream, workers=2)
        assert len(batches) == len(stream)
        assert all(b["ids"].shape == (8, 8, 8) and b["ids"].dtype.is_signed is False for b in batches)
        per_rank.append(len(batches))
    total = sum(COUNTS["train"])
    assert per_rank[0] == per_rank[1] >= -(-total // (8 * 2))


def test_train_splits_shards_by_node_then_worker(tmp_path):
    write_token_dataset(tmp_path, counts={"train": [16] * 8}, chunk_size=8)
    info = TokenDatasetInfo.open(tmp_path)
    shards_seen = []
    for rank in range(2):
        seen = set()
        for worker in range(2):
            stream = _stream(info, "train", train=True, rank=rank, world=2, workers=2)
            specs = stream._resampled(random.Random(0), worker)
            seen |= {next(specs).path for _ in range(200)}
        shards_seen.append(seen)
    assert len(shards_seen[0]) == len(shards_seen[1]) == 4 and not shards_seen[0] & shards_seen[1]


def test_train_epochs_reshuffle_and_are_reproducible(info):
    stream = _stream(info, "train", train=True)
    first = _iterate(stream, 0)
    stream.epoch.set(1)
    second = _iterate(stream, 0)
    assert not all((a["ids"] == b["ids"]).all() for a, b in zip(first, second))
    stream.epoch.set(0)
    again = _iterate(stream, 0)
    assert all((a["ids"] == b["ids"]).all() for a, b in zip(first, again))  # seeded: reproducible


def test_works_without_workers(info):
    batches = _iterate(_stream(info, "val", train=False), 0)
    assert sum(len(b["key"]) for b in batches) == sum(COUNTS["val"])


def test_truncated_shard_names_the_shard(tmp_path):
    write_token_dataset(tmp_path, counts={"val": [40]}, chunk_size=8)
    info = TokenDatasetInfo.open(tmp_path)
    shard = Path(info.shard_paths("val")[0])
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        last_member = tar.getmembers()[-1].offset
    for cut in (len(data) // 2, last_member):  # mid-member, and at a member boundary (a whole chunk lost)
        shard.write_bytes(data[:cut])
        with pytest.raises(ShardReadError, match=shard.name):
            _iterate(_stream(info, "val", train=False), 0)


def test_ids_beyond_codebook_are_caught_with_the_sample(tmp_path):
    write_token_dataset(tmp_path, counts={"val": [10]}, codebook_size=300, chunk_size=8)
    info = TokenDatasetInfo.open(tmp_path)
    ids = np.zeros((10, 8, 8), np.uint16)
    ids[3, 2, 2] = 299
    record = write_shard(tmp_path / SHARD_DIR / "val-000000.tar", ids, np.zeros(10, np.int64),
                         [f"s{i}" for i in range(10)], split="val", codec="zstd-planes", codebook_size=300, chunk_size=8)
    info.meta["shards"][0].update(sha256=record.sha256, bytes=record.bytes)
    info.meta["codebook_size"] = 200  # the dataset claims a smaller codebook than the ids use
    with pytest.raises(ShardReadError, match="'s3' has id 299"):
        _iterate(_stream(info, "val", train=False), 0)
