"""Pixel-style geometric augmentation as one affine warp per sample (TokenAdapt's path).

SeiT++ applies flip, RandomApply(p=0.5) of rotate / translate / shear, then RandomResizedCrop to
its "pixel-like" feature map. All of them are affine maps, so each sample's chain collapses into
one 2x3 matrix in normalised coordinates (``F.affine_grid`` convention: output -> input). The
same matrix warps an image and its feature map alike whatever their resolutions, which is what
TokenAdapt's training needs: ``T(A(x))`` and ``A(f(T(x)))`` see the same geometry. Unlike the
reference, flip and affine are drawn per sample, not once per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seit.augment.rrc import rrc_boxes


@dataclass
class GeoConfig:
    flip: float = 0.5
    affine_prob: float = 0.5        # RandomApply of the whole affine group
    op_prob: float = 0.5            # each of rotate, translate x/y, shear x/y inside it
    rotate: float = 30.0            # degrees
    translate: float = 0.2          # fraction of the side
    shear: float = 15.0             # degrees
    scale: tuple[float, float] = (0.08, 1.0)  # RRC area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


def random_theta(n: int, cfg: GeoConfig, grid: int = 64, generator: torch.Generator | None = None,
                 device=None) -> torch.Tensor:
    """[n, 2, 3] output -> input maps of flip, then the affine group, then RRC (box drawn on a grid x grid map)."""
    def u(*shape):
        return torch.rand(*shape, generator=generator, device=device)

    eye = torch.eye(3, device=device).expand(n, 3, 3).clone()
    flip = eye.clone()
    flip[:, 0, 0] = torch.where(u(n) < cfg.flip, -1.0, 1.0)

    apply = (u(n) < cfg.affine_prob)[:, None] & (u(n, 5) < cfg.op_prob)  # rotate, tx, ty, shx, shy
    sym = u(n, 5) * 2 - 1
    angle = torch.where(apply[:, 0], sym[:, 0] * math.radians(cfg.rotate), 0.0)
    tx = torch.where(apply[:, 1], sym[:, 1] * cfg.translate * 2, 0.0)  # normalised coords span 2
    ty = torch.where(apply[:, 2], sym[:, 2] * cfg.translate * 2, 0.0)
    shx = torch.where(apply[:, 3], torch.tan(sym[:, 3] * math.radians(cfg.shear)), 0.0)
    shy = torch.where(apply[:, 4], torch.tan(sym[:, 4] * math.radians(cfg.shear)), 0.0)
    rot = eye.clone()
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
    shear = eye.clone()
    shear[:, 0, 1], shear[:, 1, 0] = shx, shy
    shift = eye.clone()
    shift[:, 0, 2], shift[:, 1, 2] = tx, ty
    forward = shift @ rot @ shear  # input -> output of the affine group

    top, left, h, w = rrc_boxes(n, grid, grid, tuple(cfg.scale), tuple(cfg.ratio), generator, device).T.float()
    crop = eye.clone()  # output of the whole chain -> coordinates before the crop
    crop[:, 0, 0], crop[:, 1, 1] = w / grid, h / grid
    crop[:, 0, 2], crop[:, 1, 2] = (left + w / 2) / grid * 2 - 1, (top + h / 2) / grid * 2 - 1
    return (torch.linalg.inv(flip) @ torch.linalg.inv(forward) @ crop)[:, :2]


def warp(x: torch.Tensor, theta: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resample x [B,C,H,W] through theta to size x size (zeros outside, as torchvision's affine)."""
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp_ids(ids: torch.Tensor, theta: torch.Tensor, size: int, fill: int = 0) -> torch.Tensor:
    """The naive baseline: warp an id grid directly, nearest neighbour (outside: ``fill``)."""
    x = torch.cat([ids[:, None].double(), torch.ones_like(ids[:, None], dtype=torch.float64)], 1)
    out = warp(x, theta.double(), size, mode="nearest")
    return torch.where(out[:, 1] > 0.5, out[:, 0].round().long(), torch.full_like(out[:, 0], fill).long())
