"""Every chunk of one shard, in tar order: the sequential reader of curation, export and subsetting.

Training streams shards through webdataset (``token_stream``); the offline jobs here want the
plain dataset order instead (shards as listed in dataset.json, chunks in tar order, samples in
chunk order), and an error that names the shard and member when one does not decode.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from seit.data.chunk import CHUNK_EXT, Chunk, decode_chunk
from seit.data.codec import Codec, CodecError
from seit.data.dataset_info import DatasetError


def read_shard(path: str | Path, codec: Codec) -> Iterator[Chunk]:
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.name.endswith(f".{CHUNK_EXT}"):
                    continue
                try:
                    yield decode_chunk(tar.extractfile(member).read(), codec)
                except CodecError as exc:
                    raise DatasetError(f"{path}: {member.name} is corrupt: {exc}") from exc
    except tarfile.TarError as exc:
        raise DatasetError(f"{path}: cannot read the shard ({exc}); re-run task=tokenize to rebuild it") from exc


def read_split(info, split: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A whole split in dataset order: (ids uint16 [N,H,W], labels int64 [N], samples per shard).

    For jobs that need random access to every sample (a replay memory, herding): 1.28M ImageNet
    grids of 32x32 take 2.6 GB as uint16, which is the point of tokens.
    """
    codec, ids, labels, counts = info.load_codec(), [], [], []
    for shard, path in zip(info.shards(split), info.shard_paths(split)):
        chunks = list(read_shard(path, codec))
        n = sum(len(c) for c in chunks)
        if n != shard["count"]:
            raise DatasetError(f"{path} holds {n} samples, dataset.json expects {shard['count']}: the shard is truncated")
        ids += [c.ids for c in chunks]
        labels += [c.labels for c in chunks]
        counts.append(n)
    grid = tuple(info.grid)
    return (np.concatenate(ids) if ids else np.zeros((0, *grid), np.uint16),
            np.concatenate(labels) if labels else np.zeros(0, np.int64), counts)
