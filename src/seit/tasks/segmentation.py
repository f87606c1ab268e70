"""A dense head on a trained backbone's token-grid features: semantic segmentation (``eval=segmentation``).

SeiT++ reports semantic segmentation (ADE-20k, UperNet) of its token-trained ViTs; this is the
small-scale version of that probe: the backbone's per-position features ``[B, D, h, w]``
(``LoadedModel.grid_features``, the whole input, no crop) go through one of two heads:

- ``linear``: BatchNorm2d then a 1x1 conv, i.e. one linear classifier per feature-grid cell, the
  standard linear segmentation probe (DINOv2's "linear" protocol); predicts at the feature grid.
- ``decoder``: a light convolutional decoder: 3x3 conv-BN-ReLU (D -> width), bilinear x2 upsampling,
  3x3 conv-BN-ReLU (width -> width), 1x1 conv to the classes; predicts at twice the feature grid.

and the backbone is ``frozen`` (no gradient, kept in eval mode) or ``finetune``d (trained with the
head at ``backbone_lr_scale`` times the head's learning rate). The loss is cross-entropy at the
head's output grid with void ignored; scoring upsamples the logits bilinearly to each mask's full
resolution and accumulates a confusion matrix (torchmetrics) with void ignored; ``iou_scores``
turns it into per-class IoU, mIoU and pixel accuracy.

The optimizer and schedule are the base class's (``optim`` / ``scheduler``: timm's optimizer,
warmup-cosine per step); the parameter groups are built here: head, and for fine-tuning the
backbone at a lower rate, each split by timm into decayed weights and undecayed norms/biases.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics
from timm.optim import param_groups_weight_decay

from seit.tasks.base import SeitTask

HEADS = ("linear", "decoder")
MODES = ("frozen", "finetune")


class LinearHead(nn.Module):
    """Per-cell linear classifier on normalised features: ``[B, D, h, w] -> [B, C, h, w]``."""

    scale = 1  # output grid / feature grid

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.classify = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.norm(x))


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DecoderHead(nn.Module):
    """Two 3x3 conv blocks with a bilinear x2 upsampling between them, then a 1x1 classifier:
    ``[B, D, h, w] -> [B, C, 2h, 2w]``."""

    scale = 2

    def __init__(self, dim: int, num_classes: int, width: int = 128):
        super().__init__()
        self.reduce = conv_bn_relu(dim, width)
        self.refine = conv_bn_relu(width, width)
        self.classify = nn.Conv2d(width, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.classify(self.refine(x))


HEAD_SCALES = {"linear": LinearHead.scale, "decoder": DecoderHead.scale}  # output grid / feature grid


def build_head(head: str, dim: int, num_classes: int, decoder_width: int = 128) -> nn.Module:
    if head == "linear":
        return LinearHead(dim, num_classes)
    if head == "decoder":
        return DecoderHead(dim, num_classes, decoder_width)
    raise ValueError(f"segmentation head must be one of {HEADS}, got {head!r}")


def iou_scores(confusion: np.ndarray) -> dict:
    """Per-class IoU, mIoU and pixel accuracy of a confusion matrix ``[C, C]`` (rows: true, columns:
    predicted; void pixels already left out).

    IoU_c = TP / (TP + FP + FN); a class absent from both the labels and the predictions has no IoU
    (NaN) and mIoU is the mean over the others (as mmsegmentation's nanmean). Pixel accuracy is
    the share of labelled pixels predicted right.
    """
    m = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(m)
    union = m.sum(0) + m.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    total = m.sum()
    return {"iou": iou, "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "pixel_acc": float(tp.sum() / total) if total else float("nan"), "pixels": int(total)}


class SegmentationTask(SeitTask):
    """A segmentation head (``head``) on a backbone installed by ``set_backbone`` (``mode``: frozen
    or finetune). Batches: train ``{"x", "target"[, "x_flip"]}`` with targets int64 at the head's
    output grid (void = ``num_classes``); val ``{"x", "masks"}`` with full-resolution label maps.
    ``x`` is what the backbone takes (ids or uint8 images); ``x_flip`` the same images mirrored
    (tokens: tokenized mirrored, since a mirrored id grid is not the ids of the mirrored image)."""

    def __init__(self, *, head: str, mode: str, dim: int, num_classes: int, data: dict, optim: dict,
                 scheduler: dict | None = None, seed: int = 0, backbone_lr_scale: float = 0.1,
                 decoder_width: int = 128, hflip: bool = True):
        super().__init__(data=data, optim=optim, scheduler=scheduler, seed=seed)
        if mode not in MODES:
            raise ValueError(f"segmentation mode must be one of {MODES}, got {mode!r}")
        if not backbone_lr_scale > 0:
            raise ValueError(f"eval.segmentation.backbone_lr_scale={backbone_lr_scale} must be > 0")
        self.head = build_head(head, dim, num_classes, decoder_width)
        self.scale = self.head.scale
        self.void = num_classes
        self.frozen = mode == "frozen"
        self.backbone: nn.Module | None = None
        self._grid: Callable | None = None
        self.confusion = torchmetrics.classification.MulticlassConfusionMatrix(num_classes, ignore_index=self.void)
        self.last_confusion: np.ndarray | None = None  # [C, C] of the latest validation

    def set_backbone(self, net: nn.Module, grid_features: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Install the backbone (``net``, registered so it moves and, fine-tuned, trains) and the
        function that gives its grid features ``[B, D, h, w]``."""
        self.backbone = net
        self._grid = grid_features
        net.requires_grad_(not self.frozen)

    def optimized_module(self) -> nn.Module:
        return self.head

    def train(self, mode: bool = True):
        """A frozen backbone stays in eval mode (no dropout, fixed statistics)."""
        super().train(mode)
        if self.frozen and self.backbone is not None:
            self.backbone.eval()
        return self

    def create_optimizer(self, params=None) -> torch.optim.Optimizer:
        """Head groups at the optimizer's lr; fine-tuning adds the backbone's at ``backbone_lr_scale`` x lr."""
        if params is None:
            wd = float(self.hparams.optim.get("weight_decay") or 0.0)
            params = param_groups_weight_decay(self.head, weight_decay=wd)
            if not self.frozen:
                skip = getattr(self.backbone, "no_weight_decay", lambda: set())()
                for group in param_groups_weight_decay(self.backbone, weight_decay=wd, no_weight_decay_list=skip):
                    params.append({**group, "lr_scale": float(self.hparams.backbone_lr_scale)})
        return super().create_optimizer(params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C, scale*h, scale*w]`` of model inputs ``x``."""
        if self.backbone is None:
            raise RuntimeError("SegmentationTask has no backbone: call set_backbone first")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = self._grid(x)
        return self.head(feats.float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, target = batch["x"], batch["target"]
        if self.hparams.hflip:  # each sample mirrored with probability 1/2, drawn from (seed, step)
            flip = torch.rand(len(x), generator=self.step_generator(), device=self.device) < 0.5
            mirrored = batch["x_flip"] if "x_flip" in batch else x.flip(-1)
            x = torch.where(flip.view(-1, *[1] * (x.ndim - 1)), mirrored, x)
            target = torch.where(flip.view(-1, 1, 1), target.flip(-1), target)
        logits = self(x)
        if logits.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"the head predicts a {tuple(logits.shape[-2:])} grid, the targets are "
                             f"{tuple(target.shape[-2:])}")
        if (target != self.void).any():
            loss = F.cross_entropy(logits, target, ignore_index=self.void)
        else:  # an all-void batch: no labelled cell (cross-entropy would be 0/0)
            loss = logits.sum() * 0.0
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["x"]).float()
        for i, mask in enumerate(batch["masks"]):
            full = F.interpolate(logits[i:i + 1], size=tuple(mask.shape[-2:]), mode="bilinear", align_corners=False)
            self.confusion.update(full.argmax(1), mask[None].long())

    def on_validation_epoch_end(self) -> None:
        matrix = self.confusion.compute().cpu().numpy().astype(np.int64)
        self.confusion.reset()
        self.last_confusion = matrix
        scores = iou_scores(matrix)
        self.log("val/miou", scores["miou"])
        self.log("val/pixel_acc", scores["pixel_acc"])
