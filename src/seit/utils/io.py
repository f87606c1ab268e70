"""Atomic file writes: a reader sees either the old file or the whole new one, never a part."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` for a writer that takes a file name (``torch.save``,
    safetensors' ``save_file``), renamed over ``path`` once the body returns.

    The temporary name is unique (``mkstemp``: ``.NAME.XXXXXXXX.tmp`` in the same directory, so
    the rename stays on one filesystem and is atomic), the file is fsynced before the rename and
    the directory after it, and it gets the usual ``0666 & ~umask`` mode (mkstemp makes 0600; datasets
    are shared). If the body raises, the temporary file is removed and ``path`` keeps its old
    content (or stays absent). Creates the parent directories. The writer must write that very
    name: ``np.save`` appends ``.npy`` to it, so give numpy the file object of ``atomic_open``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file opened for writing, renamed over ``path`` once complete (see ``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync directories
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only set,
    and setting it to read it races with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def atomic_save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors' own save_file leaves a 0600 file in place as it writes; this one is atomic and 0666 & ~umask."""
    from safetensors.torch import save

    atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata=metadata)))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted.

    safetensors writes the metadata in hash-map order, which changes from run to run; sorted,
    the same tensors and metadata always give the same bytes (and sha256). Offsets in the
    header are relative to the data, so the data is kept as it is.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data stays 8-byte aligned
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
