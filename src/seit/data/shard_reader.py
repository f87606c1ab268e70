"""Every chunk of one shard, in tar order: the sequential reader of curation, export and subsetting.

Training streams shards through webdataset (``token_stream``); the offline jobs here want the
plain dataset order instead (shards as listed in dataset.json, chunks in tar order, samples in
chunk order), and an error that names the shard and member when one does not decode.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterator

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
