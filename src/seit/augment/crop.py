"""Crops of a ``[B, C, H, W]`` map, batched on the device (one gather, no per-sample loop).

On token embedding maps an integer-offset crop equals cropping the id grid before the lookup.
The random crop is ``aug=crop``'s only augmentation and the eval view of every recipe; the
tokenizer task crops and flips its images with these too.
"""

from __future__ import annotations

import torch


def _check(x: torch.Tensor, size: int) -> None:
    if size > x.shape[-1] or size > x.shape[-2]:
        raise ValueError(f"crop size {size} is larger than the {tuple(x.shape[-2:])} input")


def crop_at(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """Crop sample b at (top[b], left[b]); returns [B, C, size, size]."""
    ar = torch.arange(size, device=x.device)
    rows = (top[:, None] + ar)[:, :, None]  # B, s, 1
    cols = (left[:, None] + ar)[:, None, :]  # B, 1, s
    b = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_crop(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    _check(x, size)
    n = x.shape[0]
    top = torch.randint(0, x.shape[-2] - size + 1, (n,), device=x.device, generator=generator)
    left = torch.randint(0, x.shape[-1] - size + 1, (n,), device=x.device, generator=generator)
    return crop_at(x, top, left, size)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    _check(x, size)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


def random_hflip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Per-sample horizontal flip; only meaningful on pixels (a flipped token grid is not a flipped image)."""
    flip = torch.rand(x.shape[0], device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
