"""One chunk = hundreds of samples in one tar member.

A tar member costs a 512-byte header plus padding, which would dwarf a ~1 KB token sample, so
samples are packed in chunks. A chunk holds the codec-encoded ids, the labels and the sample
keys, each compressed on its own so that the id codec can change without touching the rest.

Layout: header ``<4sIIII`` (magic, n, ids bytes, labels bytes, keys bytes), then the three
payloads. Labels are int32 (-1 means unlabelled), keys are newline-separated UTF-8.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import zstandard

from seit.data.codec import Codec, CodecError, as_codec, zstd_frame_size

CHUNK_EXT = "tokens"
_HEADER = struct.Struct("<4sIIII")
_MAGIC = b"SCHK"
MAX_KEY_BYTES = 4096  # per sample key: bounds what a keys stream may claim to decompress to


@dataclass
class Chunk:
    ids: np.ndarray  # uint16 [n, H, W]
    labels: np.ndarray  # int64 [n]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def encode_chunk(chunk: Chunk, codec: Codec | str, codebook_size: int) -> bytes:
    n = len(chunk.keys)
    if chunk.ids.shape[0] != n or chunk.labels.shape[0] != n:
        raise ValueError(f"chunk has {chunk.ids.shape[0]} id grids, {chunk.labels.shape[0]} labels, {n} keys")
    bad = [k for k in chunk.keys if "\n" in k or not k or len(k.encode()) > MAX_KEY_BYTES]
    if bad:
        raise ValueError(f"sample keys must be non-empty, single-line and at most {MAX_KEY_BYTES} bytes: {bad[:3]}")
    ids = as_codec(codec).encode(chunk.ids, codebook_size)
    zc = zstandard.ZstdCompressor(level=19, write_checksum=True)
    labels = zc.compress(chunk.labels.astype("<i4").tobytes())
    keys = zc.compress("\n".join(chunk.keys).encode())
    return _HEADER.pack(_MAGIC, n, len(ids), len(labels), len(keys)) + ids + labels + keys


def decode_chunk(payload: bytes, codec: Codec | str, *, n: int | None = None,
                 grid: tuple[int, int] | None = None) -> Chunk:
    """Decode one chunk; raises CodecError on anything malformed (callers add the shard name).

    ``n`` and ``grid``, when given (the reader knows both from dataset.json), are checked against
    every count field before anything is decompressed, so a damaged count cannot allocate
    absurd memory; without them the counts are only checked against each other.
    """
    if len(payload) < _HEADER.size:
        raise CodecError(f"chunk of {len(payload)} bytes is shorter than its header")
    magic, count, n_ids, n_labels, n_keys = _HEADER.unpack_from(payload)
    if magic != _MAGIC:
        raise CodecError(f"bad chunk magic {magic!r}")
    if n is not None and count != n:
        raise CodecError(f"chunk header claims {count} samples, dataset.json implies {n}")
    if _HEADER.size + n_ids + n_labels + n_keys != len(payload):
        raise CodecError(f"chunk size {len(payload)} does not match its header (truncated?)")
    start = _HEADER.size
    shape = (count, *grid) if grid is not None else None
    ids = as_codec(codec).decode(payload[start : start + n_ids], shape=shape)
    start += n_ids
    labels_frame, keys_frame = payload[start : start + n_labels], payload[start + n_labels :]
    zstd_frame_size(labels_frame, 4 * count, "labels")
    zstd_frame_size(keys_frame, -(MAX_KEY_BYTES + 1) * max(count, 1), "keys")
    zd = zstandard.ZstdDecompressor()
    try:
        labels = np.frombuffer(zd.decompress(labels_frame), dtype="<i4")
        keys = zd.decompress(keys_frame).decode().split("\n")
    except (zstandard.ZstdError, UnicodeDecodeError) as exc:
        raise CodecError(f"labels or keys stream is corrupt: {exc}") from exc
    if not (ids.shape[0] == labels.shape[0] == len(keys) == count):
        raise CodecError(f"chunk claims {count} samples, holds {ids.shape[0]} ids / {labels.shape[0]} labels / {len(keys)} keys")
    return Chunk(ids=ids, labels=labels.astype(np.int64), keys=keys)
