"""Augmentations of the embedding map's values: Emb-Noise (SeiT) and ColorAdapt (SeiT++)."""

from __future__ import annotations

import torch


def emb_noise(x: torch.Tensor, apply: torch.Tensor, scale: float = 1.0, std: float = 1.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """In the samples where ``apply`` [B] is set: add a per-channel constant N(0,1)*scale plus
    per-element N(0,1)*std (SeiT's Noise)."""
    b, c = x.shape[:2]
    offset = torch.randn(b, c, 1, 1, generator=generator, device=x.device, dtype=x.dtype) * scale
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * std
    return torch.where(apply[:, None, None, None], x + offset + noise, x)


def color_adapt(x: torch.Tensor, apply: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """AdaIN-style swap of channel statistics: sample i takes the per-channel spatial mean and std
    of sample B-1-i. ``eps`` keeps a constant map (std 0) finite, which the reference divides by."""
    mean = x.mean((2, 3), keepdim=True)
    std = x.std((2, 3), keepdim=True, unbiased=False)
    swapped = (x - mean) / (std + eps) * std.flip(0) + mean.flip(0)
    return torch.where(apply[:, None, None, None], swapped, x)
