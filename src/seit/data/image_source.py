"""Where tokenize reads images from: ImageFolder trees, flat folders, or tar shards of JPEGs.

A source directory may hold split subdirectories (``train/``, ``val/``, ...); otherwise it is
one split, ``train``. Inside a split the layout is detected: ``*.tar`` files (WebDataset style:
``KEY.jpg`` + optional ``KEY.cls``), class subfolders (ImageFolder), or loose images (unlabelled,
label -1). Records only point at bytes, so worker processes can read them in any order.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
SPLIT_NAMES = ("train", "val", "test")


class ImageReadError(ValueError):
    """An image that cannot be read or decoded; the message names it."""


@dataclass(frozen=True)
class ImageRecord:
    key: str
    label: int
    path: str
    offset: int = -1  # byte offset of the member's data inside a tar, -1 for a plain file
    size: int = -1

    @property
    def where(self) -> str:
        return self.path if self.offset < 0 else f"{self.path}:{self.key}"

    def read_bytes(self) -> bytes:
        if self.offset < 0:
            return Path(self.path).read_bytes()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise ImageReadError(f"{self.where}: tar member truncated ({len(data)} of {self.size} bytes)")
        return data


def load_image(record: ImageRecord, size: int) -> np.ndarray:
    """Decode, convert to RGB and squash-resize (bicubic, as SeiT's tokenizer input) to uint8 [3,S,S]."""
    return decode_image(record.read_bytes(), size, record.where)


def decode_image(data: bytes, size: int, where: str) -> np.ndarray:
    """``load_image`` on bytes already read (a replay memory holds the files' bytes)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
    except Exception as exc:  # PIL raises many types for bad files
        raise ImageReadError(f"cannot read image {where}: {exc}") from exc


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _scan_tar(path: Path) -> list[ImageRecord]:
    images, labels = {}, {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                if _is_image(m.name):
                    images[key] = (m.offset_data, m.size)
                elif ext == "cls":
                    labels[key] = int(tar.extractfile(m).read().decode().strip())
    except (tarfile.TarError, ValueError, OSError) as exc:
        raise ImageReadError(f"cannot read tar shard {path}: {exc}") from exc
    return [ImageRecord(k, labels.get(k, -1), str(path), off, size) for k, (off, size) in images.items()]


def scan_split(root: Path, class_index: dict[str, int]) -> list[ImageRecord]:
    entries = sorted(os.listdir(root))
    tars = [e for e in entries if e.endswith(".tar")]
    if tars:
        return [r for t in tars for r in _scan_tar(root / t)]
    records = []
    class_dirs = [e for e in entries if (root / e).is_dir()]
    for cls in class_dirs:
        for dirpath, _, files in sorted(os.walk(root / cls)):
            for f in sorted(files):
                if _is_image(f):
                    path = Path(dirpath) / f
                    key = str(path.relative_to(root).with_suffix(""))
                    records.append(ImageRecord(key, class_index[cls], str(path)))
    if not class_dirs:
        records = [ImageRecord(os.path.splitext(e)[0], -1, str(root / e)) for e in entries if _is_image(e)]
    return records


def scan_source(source: str | os.PathLike) -> tuple[dict[str, list[ImageRecord]], list[str]]:
    """List every image of every split, in a fixed sorted order. Returns (splits, class names)."""
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"image source {root} does not exist or is not a directory")
    split_dirs = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()} or {"train": root}
    tars = any(e.endswith(".tar") for d in split_dirs.values() for e in os.listdir(d))
    classes = [] if tars else sorted({e for d in split_dirs.values() for e in os.listdir(d) if (d / e).is_dir()})
    class_index = {c: i for i, c in enumerate(classes)}
    splits = {name: scan_split(d, class_index) for name, d in split_dirs.items()}
    empty = [str(split_dirs[n]) for n, recs in splits.items() if not recs]
    if empty:
        raise ValueError(f"no images found in {', '.join(empty)} (looked for {sorted(IMAGE_EXTS)} files, "
                         "class subfolders or .tar shards)")
    if tars and not classes:
        n_cls = max(r.label for recs in splits.values() for r in recs) + 1
        classes = [str(i) for i in range(n_cls)]
    return splits, classes
