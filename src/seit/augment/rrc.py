"""Token-RRC: RandomResizedCrop of a ``[B, C, H, W]`` map, every sample its own box, one einsum.

SeiT crops the one-hot id map and resizes it bicubically before the codebook lookup. Resizing
is linear in the map, so resizing the D-channel embedding map gives exactly the same result
with K/D times less work; ``tests/unit/test_augment.py`` checks this. Each sample's resize is
written as two interpolation matrices (rows, columns) holding PyTorch's bicubic weights
(A = -0.75, half-pixel centres, taps clamped to the crop), so a batch of different boxes is
``Wy @ X @ Wx^T`` in one call and equals ``F.interpolate(crop, mode="bicubic")`` per sample.
"""

from __future__ import annotations

import math

import torch

_A = -0.75  # PyTorch's (and OpenCV's) bicubic constant


def rrc_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
              generator: torch.Generator | None = None, device=None, tries: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop box sampling for n samples at once: [n, 4] (top, left, h, w).

    Up to ``tries`` draws of area fraction in ``scale`` and log-uniform aspect ``ratio``; a sample
    whose draws never fit falls back to the centred box of the clamped ratio, as torchvision does.
    """
    area = height * width
    u = torch.rand(n, tries, 2, generator=generator, device=device)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1, device=device))
    ok = first >= 0
    pick = first.clamp_min(0)[:, None]
    h = h.gather(1, pick)[:, 0].long()
    w = w.gather(1, pick)[:, 0].long()
    # fallback: the whole map at the nearest allowed ratio
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    h = torch.where(ok, h, torch.full_like(h, fh))
    w = torch.where(ok, w, torch.full_like(w, fw))
    r = torch.rand(n, 2, generator=generator, device=device)
    top = torch.where(ok, (r[:, 0] * (height - h + 1)).long().clamp_max(height - h), (height - h) // 2)
    left = torch.where(ok, (r[:, 1] * (width - w + 1)).long().clamp_max(width - w), (width - w) // 2)
    return torch.stack([top, left, h, w], 1)


def _cubic(t: torch.Tensor) -> torch.Tensor:
    """The four bicubic tap weights for fractional offsets t: [..., 4]."""
    def near(x):
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def _resize_matrix(start: torch.Tensor, length: torch.Tensor, size: int, out: int) -> torch.Tensor:
    """[B, out, size]: bicubic weights taking each sample's [start, start+length) span to ``out`` points."""
    o = torch.arange(out, device=start.device, dtype=torch.float64)
    scale = length.double()[:, None] / out
    src = scale * (o + 0.5) - 0.5  # half-pixel centres, not clamped (PyTorch's cubic convention)
    base = torch.floor(src)
    weights = _cubic(src - base)  # [B, out, 4]
    taps = base[..., None].long() + torch.arange(-1, 3, device=start.device)
    taps = torch.minimum(taps.clamp_min(0), (length - 1)[:, None, None]) + start[:, None, None]
    matrix = torch.zeros(start.shape[0], out, size, dtype=torch.float64, device=start.device)
    return matrix.scatter_add_(2, taps, weights)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, out: int) -> torch.Tensor:
    """Crop sample b to boxes[b] = (top, left, h, w) and resize it bicubically to out x out."""
    rows = _resize_matrix(boxes[:, 0], boxes[:, 2], x.shape[-2], out).to(x.dtype)
    cols = _resize_matrix(boxes[:, 1], boxes[:, 3], x.shape[-1], out).to(x.dtype)
    return torch.einsum("boh,bchw,bpw->bcop", rows, x, cols)


def token_rrc(x: torch.Tensor, out: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
              generator: torch.Generator | None = None) -> torch.Tensor:
    boxes = rrc_boxes(x.shape[0], x.shape[-2], x.shape[-1], tuple(scale), tuple(ratio), generator, x.device)
    return resized_crop(x, boxes, out)
