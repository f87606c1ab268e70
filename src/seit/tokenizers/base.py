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


PRECISIONS = ("auto", "fp32", "bf16")


class Tokenizer(abc.ABC):
    kind: str
    image_size: int
    downsample: int
    # The encoder may run under bf16 autocast (its nearest-code search stays fp32). False for
    # tokenizers whose encode is a projection plus that search: bf16 would only cost accuracy.
    bf16: bool = False

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


def encode_device(name: str | None, local_rank: int = 0, what: str = "tokenizer.device") -> torch.device:
    """Where a tokenizer encodes: ``auto`` (or None) is ``cuda:<local_rank>`` when CUDA is there, else the
    CPU; ``cuda`` is ``cuda:<local_rank>``; ``cuda:N``, ``mps`` and ``cpu`` are taken as they are.

    Raises ValueError (one line, naming ``what``) for a device this machine does not have.
    """
    name = str(name or "auto")
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError:
        raise ValueError(f"{what}={name} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"{what}={name}: no CUDA device here (torch {torch.__version__}, "
                             f"torch.cuda.is_available() is False); use {what}=cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{what}={name} (local rank {local_rank}): this machine has {count} CUDA device(s); "
                             "run at most that many ranks per node")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{what}={name}: the MPS backend is not available here; use {what}=cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{what}={name}: tokenize runs on cpu, cuda or mps")
    return dev


def encode_precision(name: str | None, tokenizer: Tokenizer, device: torch.device, planned: str | None = None,
                     what: str = "tokenizer.precision") -> str:
    """``fp32`` or ``bf16``: what an encoder runs in. ``auto`` keeps what an interrupted build planned,
    else picks bf16 on CUDA for tokenizers that allow it (``Tokenizer.bf16``) and fp32 elsewhere.

    Raises ValueError for an unknown name, or bf16 asked of a tokenizer that cannot run in it.
    """
    name = str(name or "auto")
    if name not in PRECISIONS:
        raise ValueError(f"{what}={name} must be one of {PRECISIONS}")
    if name == "auto":
        return planned or ("bf16" if device.type == "cuda" and tokenizer.bf16 else "fp32")
    if name == "bf16" and not tokenizer.bf16:
        raise ValueError(f"{what}=bf16: the {tokenizer.kind} tokenizer encodes in fp32 only (a projection and a "
                         f"nearest-code search, which bf16 would make less exact); use {what}=fp32 or auto")
    return name


class ImageEncoder:
    """uint8 images ``[B, 3, S, S]`` -> int64 ids ``[B, H, W]`` on ``device``, as task=tokenize makes
    them (/255, ``encode``). The tokenizer is moved to ``encode_on`` when it can go there (CPU-only
    kinds stay on the CPU); ``encode_device`` says where it encodes. ``precision="bf16"`` runs the
    encoder under bf16 autocast (tokenizers with ``bf16``; their code search stays fp32); ``fp32`` is
    true fp32 on CUDA too (no TF32). Used by task=tokenize and by deployment-style readers
    (``seit.predict``, eval=pixels / robustness)."""

    def __init__(self, tokenizer: Tokenizer, device: torch.device, encode_on: torch.device | None = None,
                 precision: str = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.tokenizer, self.device, self.precision = tokenizer, device, precision
        self.encode_device = torch.device("cpu")
        want = encode_on if encode_on is not None else device
        try:
            tokenizer.to(want)
            self.encode_device = want
        except NotImplementedError:  # this tokenizer encodes on the CPU only
            pass

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.encode_device, non_blocking=True).float() / 255
        with full_precision(), torch.autocast(self.encode_device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            ids = self.tokenizer.encode(x)
        return ids.to(self.device, torch.int64)
