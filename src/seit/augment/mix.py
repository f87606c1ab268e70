"""Token-CutMix and Mixup with soft targets, batch mode as in timm's ``Mixup``.

One lambda per batch; sample i mixes with sample B-1-i. CutMix pastes a box of the flipped batch
whose area is 1-lambda of the grid, and lambda is then corrected to the box area actually
pasted (it is clipped at the borders). Targets are smoothed one-hots mixed with the same
lambda, so every target row sums to 1.
"""

from __future__ import annotations

import math

import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels[:, None], 1 - smoothing + off)


def _beta(alpha: float, generator: torch.Generator | None, device) -> float:
    """A Beta(alpha, alpha) draw from the seeded generator (ratio of two Gamma draws)."""
    g = torch._standard_gamma(torch.full((2,), alpha, device=device), generator=generator)
    return float(g[0] / g.sum())


def cutmix_box(h: int, w: int, lam: float, generator: torch.Generator | None, device) -> tuple[int, int, int, int]:
    """A box of area about (1-lam) h w centred uniformly, clipped to the grid: (top, bottom, left, right)."""
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = (torch.rand(2, generator=generator, device=device) * torch.tensor([h, w], device=device)).long().tolist()
    return max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)


def mix_batch(x: torch.Tensor, labels: torch.Tensor, num_classes: int, *, cutmix_alpha: float = 0.0,
              mixup_alpha: float = 0.0, prob: float = 1.0, switch_prob: float = 0.5, smoothing: float = 0.1,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (mixed x, soft targets [B, num_classes])."""
    targets = smooth_one_hot(labels, num_classes, smoothing)
    u = torch.rand(2, generator=generator, device=x.device).tolist()
    if (cutmix_alpha <= 0 and mixup_alpha <= 0) or u[0] >= prob:
        return x, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or u[1] < switch_prob)
    lam = _beta(cutmix_alpha if use_cutmix else mixup_alpha, generator, x.device)
    other = x.flip(0)
    if use_cutmix:
        top, bottom, left, right = cutmix_box(x.shape[-2], x.shape[-1], lam, generator, x.device)
        x = x.clone()
        x[..., top:bottom, left:right] = other[..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (x.shape[-2] * x.shape[-1])
    else:
        x = x * lam + other * (1 - lam)
    return x, targets * lam + targets.flip(0) * (1 - lam)
