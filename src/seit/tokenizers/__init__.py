"""Tokenizers: images <-> token-id grids. ``load_tokenizer`` opens any saved one by its kind."""

from __future__ import annotations

import os

from safetensors import safe_open
from safetensors.torch import load_file

from seit.utils.checkpoint_io import unreadable
from seit.tokenizers.base import Tokenizer
from seit.tokenizers.patch_kmeans import PatchKMeansTokenizer
from seit.tokenizers.taming_vqgan import TamingVQGANTokenizer
from seit.tokenizers.vq import VQTokenizer

TOKENIZERS = {
    PatchKMeansTokenizer.kind: PatchKMeansTokenizer,
    TamingVQGANTokenizer.kind: TamingVQGANTokenizer,
    VQTokenizer.kind: VQTokenizer,
}


def load_tokenizer(path: str | os.PathLike, what: str = "tokenizer checkpoint") -> Tokenizer:
    """A saved tokenizer of any kind; ``what`` (the config key that named the file) prefixes any error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} not found")
    with unreadable(path, what):  # a truncated file is named, not a bare SafetensorError
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    kind = metadata.get("kind")
    if kind not in TOKENIZERS:
        raise ValueError(f"{path}: unknown tokenizer kind {kind!r}; known kinds: {sorted(TOKENIZERS)}")
    return TOKENIZERS[kind].from_state(tensors, metadata)


__all__ = ["Tokenizer", "PatchKMeansTokenizer", "TamingVQGANTokenizer", "VQTokenizer", "load_tokenizer", "TOKENIZERS"]
