"""The tokenizer interface every tokenizer implements.

A tokenizer maps images to a grid of ids over a codebook and back. Images are float tensors
``[B, 3, S, S]`` in [0, 1] (S = ``image_size``); ids are int64 ``[B, S/p, S/p]``.
"""

from __future__ import annotations

import abc
import os
from contextlib import contextmanager

import torch

from seit.data.dataset_info import codebook_fingerprint


class Tokenizer(abc.ABC):
    kind: str
    image_size: int
    downsample: int

    @property
    @abc.abstractmethod
    def codebook(self) -> torch.Tensor:
        """The K x D embedding each id stands for; training looks ids up in it."""

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def decode(self, ids: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> None: ...

    def to(self, device) -> "Tokenizer":
        """Move the encoder's tensors (to encode training targets on the accelerator)."""
        raise NotImplementedError(f"{type(self).__name__} stays on the CPU")

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.downsample
        return (g, g)

    @property
    def codebook_size(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def codebook_dim(self) -> int:
        """The codebook's width D (each id's embedding has D values)."""
        return int(self.codebook.shape[1])

    @property
    def fingerprint(self) -> str:
        return codebook_fingerprint(self.codebook)


@contextmanager
def full_precision():
    """float32 matmuls and convolutions on CUDA (no TF32) while images are tokenized, so an encoder
    on the GPU rounds as close to the CPU's (task=tokenize's) as it can."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class ImageEncoder:
    """uint8 images ``[B, 3, S, S]`` -> int64 ids ``[B, H, W]`` on ``device``, as task=tokenize makes
    them (/255, ``encode``). The tokenizer is moved to ``encode_on`` when it can go there (CPU-only
    kinds stay on the CPU); ``encode_device`` says where it encodes. Used by deployment-style
    readers (``seit.predict``, eval=pixels / robustness)."""

    def __init__(self, tokenizer: Tokenizer, device: torch.device, encode_on: torch.device | None = None):
        self.tokenizer, self.device = tokenizer, device
        self.encode_device = torch.device("cpu")
        want = encode_on if encode_on is not None else device
        try:
            tokenizer.to(want)
            self.encode_device = want
        except NotImplementedError:  # this tokenizer encodes on the CPU only
            pass

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with full_precision():
            ids = self.tokenizer.encode(images.to(self.encode_device).float() / 255)
        return ids.to(self.device, torch.int64)
