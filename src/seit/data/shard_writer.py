"""Write one token shard: a plain tar of chunk members, written atomically.

The tar is assembled by hand (header + data + padding per member, two zero blocks at the end)
instead of through ``tarfile``, which pads every archive to 10 KiB: on a shard of a few hundred
~1 KB samples that padding alone would cost tens of bytes per sample.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import asdict, dataclass

import numpy as np

from seit.data.chunk import CHUNK_EXT, Chunk, encode_chunk
from seit.data.codec import Codec, as_codec
from seit.utils.io import atomic_write_bytes

_BLOCK = 512


@dataclass
class ShardRecord:
    name: str
    split: str
    count: int
    sha256: str
    bytes: int
    skipped: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def tar_member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed, so that the same samples give a bit-identical shard
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    pad = (-len(data)) % _BLOCK
    return header + data + b"\0" * pad


def shard_bytes(ids: np.ndarray, labels: np.ndarray, keys: list[str], *, stem: str, codec: Codec | str,
                codebook_size: int, chunk_size: int) -> bytes:
    parts, codec = [], as_codec(codec)
    for c, start in enumerate(range(0, len(keys), chunk_size)):
        end = start + chunk_size
        chunk = Chunk(ids=ids[start:end], labels=labels[start:end], keys=keys[start:end])
        parts.append(tar_member(f"{stem}-{c:05d}.{CHUNK_EXT}", encode_chunk(chunk, codec, codebook_size)))
    parts.append(b"\0" * (2 * _BLOCK))
    return b"".join(parts)


def encode_shard(name: str, ids: np.ndarray, labels: np.ndarray, keys: list[str], *, split: str, codec: Codec | str,
                 codebook_size: int, chunk_size: int, skipped: int = 0) -> tuple[bytes, ShardRecord]:
    """A shard's bytes and its record, not yet written (a rebuild checks the sha256 before it replaces a file)."""
    data = shard_bytes(ids, labels, keys, stem=name.rsplit(".", 1)[0], codec=codec,
                       codebook_size=codebook_size, chunk_size=chunk_size)
    return data, ShardRecord(name=name, split=split, count=len(keys), sha256=hashlib.sha256(data).hexdigest(),
                             bytes=len(data), skipped=skipped)


def write_shard(path: str | os.PathLike, ids: np.ndarray, labels: np.ndarray, keys: list[str], *,
                split: str, codec: Codec | str, codebook_size: int, chunk_size: int, skipped: int = 0) -> ShardRecord:
    data, record = encode_shard(os.path.basename(path), ids, labels, keys, split=split, codec=codec,
                                codebook_size=codebook_size, chunk_size=chunk_size, skipped=skipped)
    atomic_write_bytes(path, data)
    return record
