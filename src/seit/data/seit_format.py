"""SeiT's released token format (naver-ai/seit ``datasets.py``), re-implemented from its description.

Per image, each id b < 255 is one byte; an id >= 255 is written as escape bytes 255 (each adds
255) followed by the remainder, so ids 0-254 take 1 byte and 255-509 take 2. All images are
concatenated into one gzip stream (``*-token.data.bin.gz``) with a gzipped ``.npy`` of N+1 byte
offsets beside it (``*-token.index.npy.gz``). Used for the storage comparison and for import and
export of SeiT token sets.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from seit.utils.io import atomic_open, atomic_write_bytes, atomic_write_json

ESCAPE = 255


def escape_encode(ids: np.ndarray) -> bytes:
    """One image's ids (any shape) -> SeiT's escape-byte string."""
    flat = ids.reshape(-1).astype(np.int64)
    if flat.size and flat.min() < 0:
        raise ValueError("ids must be non-negative")
    escapes = flat // ESCAPE
    lengths = escapes + 1
    out = np.full(int(lengths.sum()), ESCAPE, dtype=np.uint8)
    ends = np.cumsum(lengths) - 1
    out[ends] = (flat - escapes * ESCAPE).astype(np.uint8)
    return out.tobytes()


def escape_decode(data: bytes, num_tokens: int) -> np.ndarray:
    """SeiT's escape-byte string -> ``num_tokens`` ids (int64); raises if the count is off."""
    raw = np.frombuffer(data, dtype=np.uint8)
    is_value = raw != ESCAPE
    if raw.size and not is_value[-1]:
        raise ValueError("token string ends inside an escape sequence")
    values = raw[is_value].astype(np.int64)
    if values.size != num_tokens:
        raise ValueError(f"decoded {values.size} tokens, expected {num_tokens}")
    escape_counts = np.diff(np.concatenate([[-1], np.flatnonzero(is_value)])) - 1
    return values + ESCAPE * escape_counts


# --- files ------------------------------------------------------------------------------------
# A SeiT token set dir holds, per split, ``{prefix}-{split}-token.data.bin.gz``,
# ``{prefix}-{split}-token.index.npy.gz`` and ``{prefix}-{split}-label.txt`` (one class id per line),
# and once ``codebook.ckpt`` (a torch-saved K x D float tensor) and optionally a synonyms json.
CODEBOOK_CKPT = "codebook.ckpt"
SYNONYMS_FILES = ("codebook-synonyms.json", "synonyms.json")  # the first is the name SeiT's scripts pass
_GZIP_ERRORS = (OSError, EOFError, zlib.error)  # a corrupt or truncated gzip stream
# zlib's default level: on random token bytes level 9 is ~4x slower (minutes on an ImageNet split) for
# under 1% fewer bytes. Readers do not care which level wrote a stream.
GZIP_LEVEL = 6
# SeiT's own loader honours a single escape byte per id, so files meant for it hold ids <= 509.
MAX_FILE_ID = 2 * ESCAPE - 1


class SeitFormatError(ValueError):
    """A SeiT token file that is missing or malformed; the message names the file."""


def seit_split_paths(root: str | os.PathLike, prefix: str, split: str) -> tuple[Path, Path, Path]:
    """(data, index, labels) paths of one split."""
    stem = Path(root) / f"{prefix}-{split}"
    return (Path(f"{stem}-token.data.bin.gz"), Path(f"{stem}-token.index.npy.gz"), Path(f"{stem}-label.txt"))


def _require(path: Path) -> Path:
    if not path.is_file():
        raise SeitFormatError(f"{path} not found")
    return path


def read_seit_split(root: str | os.PathLike, prefix: str, split: str, grid: tuple[int, int] = (32, 32),
                    codebook_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One split -> (ids uint16 [N, H, W], labels int64 [N]).

    The data stream is read image by image, never whole, so a split costs the decoded ids in
    memory and no more. Every image must decode to exactly H*W ids below ``codebook_size``.
    """
    data_path, index_path, label_path = seit_split_paths(root, prefix, split)
    offsets = _read_offsets(_require(index_path))
    labels = _read_labels(_require(label_path))
    n = len(offsets) - 1
    if len(labels) != n:
        raise SeitFormatError(f"{label_path} has {len(labels)} labels, but {index_path.name} indexes {n} images")
    h, w = grid
    limit = codebook_size or 65536  # ids are kept as uint16
    ids = np.empty((n, h, w), np.uint16)
    try:
        with gzip.open(_require(data_path), "rb") as f:
            for i in range(n):
                size = int(offsets[i + 1] - offsets[i])
                data = f.read(size)
                if len(data) != size:
                    raise SeitFormatError(f"{data_path} ends at byte {offsets[i] + len(data)}, inside image {i}, but "
                                          f"{index_path.name} says it runs to byte {offsets[-1]} (truncated data or "
                                          "garbled index)")
                try:
                    image = escape_decode(data, h * w)
                except ValueError as exc:
                    raise SeitFormatError(f"{data_path}: image {i} (bytes {offsets[i]}..{offsets[i + 1]}): {exc} "
                                          f"for a {h}x{w} grid") from None
                if image.max(initial=0) >= limit:
                    raise SeitFormatError(f"{data_path}: image {i} holds id {image.max()}, outside the codebook's "
                                          f"{limit} entries")
                ids[i] = image.reshape(h, w)
            if f.read(1):
                raise SeitFormatError(f"{data_path} holds more than the {offsets[-1]} bytes that {index_path.name} "
                                      "indexes (garbled index?)")
    except _GZIP_ERRORS as exc:
        raise SeitFormatError(f"{data_path} is not a readable gzip stream: {exc}") from exc
    return ids, labels


def _read_offsets(path: Path) -> np.ndarray:
    try:
        offsets = np.load(io.BytesIO(gzip.decompress(path.read_bytes())), allow_pickle=False)
    except (*_GZIP_ERRORS, ValueError) as exc:
        raise SeitFormatError(f"{path} is not a gzipped .npy array: {exc}") from exc
    if offsets.ndim != 1 or offsets.size == 0 or offsets.dtype.kind not in "iu":
        raise SeitFormatError(f"{path} must hold a 1-D integer array of N+1 offsets, not {offsets.dtype} "
                              f"{offsets.shape}")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or (np.diff(offsets) < 0).any():
        raise SeitFormatError(f"{path}: offsets must start at 0 and never decrease (garbled index)")
    return offsets


def _read_labels(path: Path) -> np.ndarray:
    labels = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        try:
            labels.append(int(line))
        except ValueError:
            raise SeitFormatError(f"{path} line {line_no}: {line!r} is not an integer class id") from None
    return np.array(labels, dtype=np.int64)


def write_seit_split(root: str | os.PathLike, prefix: str, split: str, ids: np.ndarray, labels: np.ndarray) -> None:
    """ids [N, ...] and labels [N] -> the split's three files, each written atomically."""
    data_path, index_path, label_path = seit_split_paths(root, prefix, split)
    if len(ids) != len(labels):
        raise ValueError(f"{data_path}: {len(ids)} id grids but {len(labels)} labels")
    if len(ids) and ids.max() > MAX_FILE_ID:
        raise ValueError(f"{data_path}: id {ids.max()} is beyond {MAX_FILE_ID}, the largest id SeiT's loader "
                         "reads back (it takes one escape byte per id); a codebook of K <= 510 is needed")
    offsets = np.zeros(len(ids) + 1, np.int64)
    with _atomic_gzip(data_path) as f:
        for i, image in enumerate(ids):
            data = escape_encode(image)
            f.write(data)
            offsets[i + 1] = offsets[i] + len(data)
    npy = io.BytesIO()
    np.save(npy, offsets)
    atomic_write_bytes(index_path, gzip.compress(npy.getvalue(), compresslevel=GZIP_LEVEL, mtime=0))
    atomic_write_bytes(label_path, "".join(f"{int(label)}\n" for label in labels).encode())


@contextmanager
def _atomic_gzip(path: Path):
    """A gzip stream into a temp file beside ``path``, renamed over it only once complete.

    Streamed rather than built in memory: a full ImageNet split is over a gigabyte of bytes.
    The header carries no name and mtime 0, so the same ids always give the same file.
    """
    with atomic_open(path) as raw:
        with gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=raw, mtime=0) as f:
            yield f


def read_seit_codebook(root: str | os.PathLike) -> torch.Tensor:
    path = _require(Path(root) / CODEBOOK_CKPT)
    try:
        codebook = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many kinds on a bad file
        raise SeitFormatError(f"{path} cannot be loaded with torch.load: {exc}") from exc
    if not isinstance(codebook, torch.Tensor) or codebook.ndim != 2 or not codebook.is_floating_point():
        what = (f"a {codebook.dtype} tensor of shape {tuple(codebook.shape)}" if isinstance(codebook, torch.Tensor)
                else type(codebook).__name__)
        raise SeitFormatError(f"{path} must hold a K x D float tensor, holds {what}")
    return codebook


def write_seit_codebook(root: str | os.PathLike, codebook: torch.Tensor) -> None:
    """Saved as a plain float32 tensor, as SeiT's code loads it."""
    buf = io.BytesIO()
    torch.save(codebook.detach().cpu().to(torch.float32).contiguous(), buf)
    atomic_write_bytes(Path(root) / CODEBOOK_CKPT, buf.getvalue())


def find_synonyms(root: str | os.PathLike) -> Path | None:
    """The synonyms json of a SeiT dir (either name SeiT's releases use), or None."""
    return next((p for p in (Path(root) / name for name in SYNONYMS_FILES) if p.is_file()), None)


def read_synonyms(root: str | os.PathLike, codebook_size: int | None = None) -> dict[str, list[int]] | None:
    """``{str(token id): [token ids, nearest first]}``, or None when the dir has no synonyms file."""
    path = find_synonyms(root)
    return None if path is None else load_synonyms_json(path, codebook_size)


def load_synonyms_json(path: Path, codebook_size: int | None = None) -> dict[str, list[int]]:
    try:
        table = json.loads(_require(path).read_text())
    except json.JSONDecodeError as exc:
        raise SeitFormatError(f"{path} is not valid JSON: {exc}") from exc
    limit = codebook_size or 65536
    if not isinstance(table, dict):
        raise SeitFormatError(f"{path} must map token ids to lists of token ids, holds a {type(table).__name__}")
    for key, ids in table.items():
        ok = key.isdigit() and int(key) < limit and isinstance(ids, list)
        if not ok or not all(isinstance(i, int) and 0 <= i < limit for i in ids):
            raise SeitFormatError(f"{path}: entry {key!r}: {str(ids)[:80]} is not a list of token ids "
                                  f"below {limit} under a token id key")
    return table


def write_synonyms(root: str | os.PathLike, table: dict[str, list[int]], name: str = SYNONYMS_FILES[0]) -> None:
    atomic_write_json(Path(root) / name, table)
