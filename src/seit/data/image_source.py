"""Where tokenize reads images from: ImageFolder trees, flat folders, or tar shards of JPEGs.

A source directory may hold split subdirectories (``train/``, ``val/``, ...); otherwise it is
one split, ``train``. Inside a split the layout is detected: ``*.tar`` files (WebDataset style:
``KEY.jpg`` + optional ``KEY.cls``), class subfolders (ImageFolder), or loose images (unlabelled,
label -1). Records only point at bytes, so worker processes can read them in any order.
Everything else found there is not tokenized; ``list_source`` names it, so nothing is dropped
without a word. What would lose or mislabel images is refused by name instead: a key twice in a
tar (one image would hide the other), a split where some images have a label and others none (a
tar sample without ``.cls``, an image beside the class folders).

Decoding brings every mode Pillow opens to 8-bit RGB by its meaning, not its raw numbers:
16-bit and 32-bit integer images are scaled from 0..65535 (the range PNG, TIFF and PGM store
them in), float images from 0..1, images with transparency are composited onto white, and
EXIF orientation is applied.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
SPLIT_NAMES = ("train", "val", "test")
_WIDE_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;16BS", "I;16LS", "I;32", "I;32B"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


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
        try:
            if self.offset < 0:
                return Path(self.path).read_bytes()
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as exc:  # a broken symlink, a vanished file, a permission
            raise ImageReadError(f"cannot read image {self.where}: {exc.strerror or exc}") from exc
        if len(data) != self.size:
            raise ImageReadError(f"tar {self.path}: member {self.key} is truncated ({len(data)} of {self.size} "
                                 "bytes): the tar file is incomplete")
        return data


def load_image(record: ImageRecord, size: int) -> np.ndarray:
    """Decode, convert to RGB and squash-resize (bicubic, as SeiT's tokenizer input) to uint8 [3,S,S]."""
    return decode_image(record.read_bytes(), size, record.where)


def decode_image(data: bytes, size: int, where: str) -> np.ndarray:
    """``load_image`` on bytes already read (a replay memory holds the files' bytes)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = to_rgb(img).resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
    except UnidentifiedImageError:  # its message names the BytesIO, not the file
        raise ImageReadError(f"cannot read image {where}: not an image file Pillow can identify (another kind of "
                             "file with an image extension, or its header is damaged)") from None
    except Exception as exc:  # PIL raises many types for bad files
        raise ImageReadError(f"cannot read image {where}: {exc}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB with the pixels the file means, whatever its mode and bit depth (see the module doc)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_INT_MODES:
        wide = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.round(np.clip(wide / 257.0, 0, 255)).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        unit = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.round(np.clip(unit * 255.0, 0, 255)).astype(np.uint8), "L").convert("RGB")
    if img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _scan_tar(path: Path, ignored: list[str]) -> list[ImageRecord]:
    images, labels, last = {}, {}, None
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                last = m
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                if _is_image(m.name):
                    _once(path, key, images, m.name, (m.offset_data, m.size))
                elif ext == "cls":
                    _once(path, key, labels, m.name, _label(path, m, tar.extractfile(m).read()))
                else:
                    ignored.append(f"{path}:{m.name}")
            _check_tar_end(path, tar.offset)
    except (tarfile.TarError, OSError) as exc:
        raise ImageReadError(f"cannot read tar shard {path}: {_where_cut(path, last, exc)}") from exc
    ignored += [f"{path}:{labels[k][0]}" for k in labels if k not in images]  # a label without an image
    return [ImageRecord(k, labels[k][1] if k in labels else -1, str(path), off, size)
            for k, (_, (off, size)) in images.items()]


def _once(path: Path, key: str, seen: dict, name: str, value) -> None:
    """WebDataset groups a sample's files by key: a second image (or label) of a key would replace the first."""
    if key in seen:
        raise ImageReadError(f"tar {path}: key {key} appears twice ({seen[key][0]} and {name}): one would hide the "
                             "other; give every sample its own key")
    seen[key] = (name, value)


def _label(path: Path, member: tarfile.TarInfo, data: bytes) -> int:
    try:
        label = int(data.decode().strip())
    except (UnicodeDecodeError, ValueError):
        label = -1
    if label < 0:
        raise ImageReadError(f"tar {path}: member {member.name} holds {data[:20]!r}, not a class index (an integer >= 0)")
    return label


def _where_cut(path: Path, last: tarfile.TarInfo | None, exc: Exception) -> str:
    """The error, with the member it is in (cut inside its data) or after (its padding or the next header)."""
    if last is None:
        return str(exc)
    size = os.path.getsize(path)
    if last.offset_data + last.size > size:
        return f"{exc}; member {last.name} is truncated"
    if last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE > size:
        return f"the file ends after member {last.name} (cut short: the members after it are lost)"
    return f"{exc}, after member {last.name}"


def _check_tar_end(path: Path, end: int) -> None:
    """tarfile stops quietly at a cut or corrupt header; only zero padding may follow the last member."""
    with open(path, "rb") as f:
        f.seek(end)
        if f.read(8 * 512).strip(b"\0"):
            raise tarfile.ReadError("unreadable or truncated member header")


def scan_split(root: Path, class_index: dict[str, int], ignored: list[str] | None = None) -> list[ImageRecord]:
    """The split's records; what it holds but does not tokenize goes to ``ignored``."""
    ignored = [] if ignored is None else ignored
    entries = sorted(os.listdir(root))
    tars = [e for e in entries if e.endswith(".tar")]
    if tars:
        ignored += [str(root / e) for e in entries if not e.endswith(".tar")]
        records = [r for t in tars for r in _scan_tar(root / t, ignored)]
        unlabelled = [r for r in records if r.label < 0]
        if 0 < len(unlabelled) < len(records):
            r = unlabelled[0]
            raise ValueError(f"tar {r.path}: sample {r.key} has no member {r.key}.cls, while {len(records) - len(unlabelled)} "
                             f"of the {len(records)} samples in {root} have one: label every sample of a split, or none")
        return records
    records = []
    class_dirs = [e for e in entries if (root / e).is_dir()]
    for cls in class_dirs:
        for dirpath, _, files in sorted(os.walk(root / cls)):
            for f in sorted(files):
                path = Path(dirpath) / f
                if not _is_image(f):
                    ignored.append(str(path))
                    continue
                key = str(path.relative_to(root).with_suffix(""))
                records.append(ImageRecord(key, class_index[cls], str(path)))
    loose = [e for e in entries if e not in class_dirs and _is_image(e)]
    if class_dirs and loose:
        raise ValueError(f"{root / loose[0]} (and {len(loose) - 1} more) is an image beside the class folders of "
                         f"{root}: it has no class; move it into its class folder, or out of the source")
    if class_dirs:
        ignored += [str(root / e) for e in entries if e not in class_dirs]
    else:
        records = [ImageRecord(os.path.splitext(e)[0], -1, str(root / e)) for e in loose]
        ignored += [str(root / e) for e in entries if not _is_image(e)]
    return records


@dataclass
class SourceListing:
    """Every image of every split in a fixed sorted order, the class names, and what is not tokenized."""

    splits: dict[str, list[ImageRecord]]
    classes: list[str]
    ignored: list[str] = field(default_factory=list)

    def unlabelled(self) -> dict[str, int]:
        """How many images of each split have no label (-1)."""
        return {name: sum(r.label < 0 for r in recs) for name, recs in self.splits.items()}

    def empty_classes(self) -> dict[str, list[str]]:
        """The classes without an image in each split (the class list keeps them, so labels stay stable)."""
        out = {}
        for name, recs in self.splits.items():
            used = {r.label for r in recs}
            out[name] = [c for i, c in enumerate(self.classes) if i not in used]
        return out


def list_source(source: str | os.PathLike) -> SourceListing:
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"image source {root} does not exist or is not a directory")
    split_dirs = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()} or {"train": root}
    tars = any(e.endswith(".tar") for d in split_dirs.values() for e in os.listdir(d))
    classes = [] if tars else sorted({e for d in split_dirs.values() for e in os.listdir(d) if (d / e).is_dir()})
    class_index = {c: i for i, c in enumerate(classes)}
    ignored: list[str] = []
    if split_dirs.get("train") != root:
        ignored += [str(root / e) for e in sorted(os.listdir(root)) if e not in split_dirs]
    splits = {name: scan_split(d, class_index, ignored) for name, d in split_dirs.items()}
    empty = [str(split_dirs[n]) for n, recs in splits.items() if not recs]
    if empty:
        raise ValueError(f"no images found in {', '.join(empty)} (looked for {sorted(IMAGE_EXTS)} files, "
                         "class subfolders or .tar shards)")
    if tars and not classes:
        n_cls = max(r.label for recs in splits.values() for r in recs) + 1
        classes = [str(i) for i in range(n_cls)]
    return SourceListing(splits, classes, ignored)


def scan_source(source: str | os.PathLike) -> tuple[dict[str, list[ImageRecord]], list[str]]:
    """List every image of every split, in a fixed sorted order. Returns (splits, class names)."""
    listing = list_source(source)
    return listing.splits, listing.classes
