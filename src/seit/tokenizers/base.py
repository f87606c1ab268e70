"""The tokenizer interface every tokenizer implements.

A tokenizer maps images to a grid of ids over a codebook and back. Images are float tensors
``[B, 3, S, S]`` in [0, 1] (S = ``image_size``); ids are int64 ``[B, S/p, S/p]``.
"""

from __future__ import annotations

import abc
import os

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
