"""The one shard reader: every path that reads token shards goes through ``read_chunks``.

Readers of a whole split use its split-level API, so that reading a split is written once:
``split_chunks`` (chunks with their shard and index), ``read_split`` (everything in memory, in
dataset or key order) and ``read_rows`` (some positions, decoding only their chunks).

The training and validation streams, export (``task=convert``), embed, curation reports, subset
writing, the continual memory and ``task=verify`` all read here, and all get the same checks of
what dataset.json promises (a ``ShardSpec``):

- the file has the recorded size and sha256 (hashed once per process per file: about 1 s for the
  1.4 GB of a full ImageNet-1k token set, at the 1.5 GB/s one core hashes here);
- the tar is parsed strictly: a damaged header or padding anywhere is an error, not the end of
  the archive, and nothing but zeros may follow the end-of-archive marker;
- members are the shard's chunks in order, and there are exactly as many as the count implies;
- each chunk holds exactly the samples the count implies, checked against its count fields
  before anything is decompressed;
- every id is < K, every label is -1 (unlabelled) or a class index, the grid is the dataset's;
- a shard that yields nothing is an error (unless dataset.json records it empty: every image
  of it was unreadable and skipped).

Anything wrong raises ``ShardReadError`` naming the shard, and the chunk or sample where known.
Without this, a damaged tar header mid-archive reads as a clean end of file and silently drops
every sample after it.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from seit.data.chunk import CHUNK_EXT, Chunk, decode_chunk
from seit.data.codec import Codec, CodecError
from seit.data.dataset_info import DatasetError, ShardSpec

_BLOCK = 512
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
# path -> (size, mtime_ns, inode) of the file whose sha256 was checked in this process
_VERIFIED: dict[str, tuple[int, int, int]] = {}


class ShardReadError(DatasetError):
    """A shard that is missing, truncated, corrupt or not what dataset.json says; names the shard."""

    def __init__(self, message: str):
        super().__init__(f"{message}; scrub the dataset with `python run.py task=verify data.root=DIR` "
                         "(repair=true rebuilds damaged shards from parity or the source images)")


def load_shard(spec: ShardSpec) -> bytes:
    """The shard's bytes, checked against the recorded size and (once per process) sha256."""
    try:
        stat = os.stat(spec.path)
        if spec.bytes is not None and stat.st_size != spec.bytes:
            raise ShardReadError(f"shard {spec.path} has {stat.st_size} bytes, dataset.json records {spec.bytes} "
                                 f"({'truncated' if stat.st_size < spec.bytes else 'extended'})")
        data = Path(spec.path).read_bytes()
    except FileNotFoundError:
        raise ShardReadError(f"shard {spec.path} listed in dataset.json is missing") from None
    except OSError as exc:
        raise ShardReadError(f"shard {spec.path} cannot be read: {exc}") from exc
    stamp = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if spec.sha256 and _VERIFIED.get(spec.path) != stamp:
        actual = hashlib.sha256(data).hexdigest()
        if actual != spec.sha256:
            raise ShardReadError(f"shard {spec.path} has sha256 {actual[:12]}…, dataset.json records "
                                 f"{spec.sha256[:12]}…: the file is corrupt")
        _VERIFIED[spec.path] = stamp
    return data


def tar_members(data: bytes, where: str) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of every member of a plain tar, parsed strictly (see the module doc)."""
    pos = 0
    while True:
        block = data[pos : pos + _BLOCK]
        if len(block) < _BLOCK:
            raise ShardReadError(f"shard {where} ends at byte {len(data)} without an end-of-archive marker (truncated)")
        if not block.strip(b"\0"):
            rest = data[pos:]
            if len(rest) < 2 * _BLOCK or rest.strip(b"\0"):
                raise ShardReadError(f"shard {where}: the end-of-archive marker at byte {pos} is "
                                     f"{'short' if len(rest) < 2 * _BLOCK else 'followed by data'}")
            return
        try:
            info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        except tarfile.HeaderError as exc:
            raise ShardReadError(f"shard {where}: damaged tar header at byte {pos} ({exc})") from None
        if info.type not in _REGULAR:
            raise ShardReadError(f"shard {where}: member {info.name!r} at byte {pos} is not a regular file")
        start, end = pos + _BLOCK, pos + _BLOCK + info.size
        pos = start + -(-info.size // _BLOCK) * _BLOCK
        if pos > len(data):
            raise ShardReadError(f"shard {where}: member {info.name!r} runs past the end of the file (truncated)")
        if data[end:pos].strip(b"\0"):
            raise ShardReadError(f"shard {where}: member {info.name!r} has non-zero padding (corrupt)")
        yield info.name, data[start:end]


def read_chunks(spec: ShardSpec, codec: Codec, select: Callable[[int], bool] | None = None
                ) -> Iterator[tuple[int, Chunk]]:
    """(chunk index, Chunk) of every chunk of the shard that ``select(index)`` keeps (all by default).

    All members are checked (names, order, count, sample count from the chunk header); only the
    selected ones are decoded. Raises ShardReadError.
    """
    data = load_shard(spec)
    stem, index = Path(spec.path).name.rsplit(".", 1)[0], 0
    for name, payload in tar_members(data, spec.path):
        expected = f"{stem}-{index:05d}.{CHUNK_EXT}"
        if name != expected:
            raise ShardReadError(f"shard {spec.path}: member {index} is {name!r}, expected {expected!r}")
        if index >= spec.num_chunks:
            raise ShardReadError(f"shard {spec.path} holds more than the {spec.num_chunks} chunks that "
                                 f"its {spec.count} samples fill")
        where = f"chunk {index} ({name}) of shard {spec.path}"
        n = spec.chunk_count(index)
        if select is None or select(index):
            try:
                chunk = decode_chunk(payload, codec, n=n, grid=spec.grid)
            except CodecError as exc:
                raise ShardReadError(f"{where} is corrupt: {exc}") from None
            check_values(chunk, spec, where)
            yield index, chunk
        elif len(payload) < 8 or int.from_bytes(payload[4:8], "little") != n:
            raise ShardReadError(f"{where} does not hold the {n} samples dataset.json implies")
        index += 1
    if index == 0 and spec.count:
        raise ShardReadError(f"shard {spec.path} holds no chunk (dataset.json records {spec.count} samples)")
    if index != spec.num_chunks:
        raise ShardReadError(f"shard {spec.path} holds {index} chunks, dataset.json implies {spec.num_chunks} "
                             f"({spec.count} samples of {spec.chunk_size} per chunk): the shard is truncated")


def check_values(chunk: Chunk, spec: ShardSpec, where: str) -> None:
    """Every id < K and every label -1 or a class index; names the first bad sample."""
    if chunk.ids.size:
        flat = chunk.ids.reshape(len(chunk), -1).max(1)
        if int(flat.max()) >= spec.codebook_size:
            bad = int(np.argmax(flat >= spec.codebook_size))
            raise ShardReadError(f"{where}: sample {chunk.keys[bad]!r} has id {int(flat[bad])} >= codebook size "
                                 f"{spec.codebook_size}")
    wrong = (chunk.labels < -1) | (chunk.labels >= spec.num_classes)
    if wrong.any():
        bad = int(np.argmax(wrong))
        raise ShardReadError(f"{where}: sample {chunk.keys[bad]!r} has label {int(chunk.labels[bad])}, outside the "
                             f"{spec.num_classes} classes of dataset.json")


def read_shard(spec: ShardSpec, codec: Codec) -> Iterator[Chunk]:
    """Every chunk of one shard, in order (see ``read_chunks``)."""
    for _, chunk in read_chunks(spec, codec):
        yield chunk


def split_chunks(info, split: str, select: Callable[[ShardSpec, int], bool] | None = None
                 ) -> Iterator[tuple[ShardSpec, int, Chunk]]:
    """(shard, chunk index, Chunk) of every chunk of a split in dataset order that ``select(shard,
    index)`` keeps (all by default): for callers that show progress or name where a sample lives.
    Every chunk is checked as ``read_chunks`` does; only the selected ones are decoded."""
    codec = info.load_codec()
    for spec in info.shard_specs(split):
        keep = None if select is None else (lambda index, spec=spec: select(spec, index))
        for index, chunk in read_chunks(spec, codec, keep):
            yield spec, index, chunk


def stack(chunks: Iterable[Chunk], grid) -> tuple[np.ndarray, np.ndarray]:
    """(ids uint16 [N,H,W], labels int64 [N]) of chunks, in their order; empty arrays for none."""
    chunks = list(chunks)
    if not chunks:
        return np.zeros((0, *grid), np.uint16), np.zeros(0, np.int64)
    return np.concatenate([c.ids for c in chunks]), np.concatenate([c.labels for c in chunks])


def read_split(info, split: str, *, by_key: bool = False) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A whole split: (ids uint16 [N,H,W], labels int64 [N], samples per shard), in dataset order,
    or, ``by_key``, ordered by sample key (the order ``task=convert`` exports in: imported keys are
    ``{split}/{index:08d}``, so that is SeiT's own order).

    For jobs that need random access to every sample (a replay memory, herding): 1.28M ImageNet
    grids of 32x32 take 2.6 GB as uint16, which is the point of tokens.
    """
    chunks = [chunk for _, _, chunk in split_chunks(info, split)]
    ids, labels = stack(chunks, info.grid)
    if by_key:
        keys = [key for chunk in chunks for key in chunk.keys]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        ids, labels = ids[order], labels[order]
    return ids, labels, [spec.count for spec in info.shard_specs(split)]


def read_rows(info, split: str, rows) -> np.ndarray:
    """ids [len(rows), H, W] of the given positions of a split (dataset order; a position may repeat),
    decoding only the chunks that hold them."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    first, pos = {}, 0  # (shard path, chunk index) -> split position of the chunk's first sample
    for spec in info.shard_specs(split):
        for index in range(spec.num_chunks):
            first[spec.path, index] = pos
            pos += spec.chunk_count(index)
    if wanted.size and (wanted[0] < 0 or wanted[-1] >= pos):
        raise IndexError(f"rows must lie in [0, {pos}) for split {split!r} of {info.root}, got "
                         f"{int(wanted[0])}..{int(wanted[-1])}")

    def span(spec: ShardSpec, index: int) -> tuple[int, int, int]:
        """The chunk's first split position, and the slice of ``wanted`` that falls into the chunk."""
        start = first[spec.path, index]
        lo, hi = np.searchsorted(wanted, [start, start + spec.chunk_count(index)])
        return start, int(lo), int(hi)

    def holds(spec: ShardSpec, index: int) -> bool:
        _, lo, hi = span(spec, index)
        return lo < hi

    out = np.zeros((len(rows), *info.grid), np.uint16)
    for spec, index, chunk in split_chunks(info, split, holds):
        start, lo, hi = span(spec, index)
        out[order[lo:hi]] = chunk.ids[wanted[lo:hi] - start]
    return out
