"""The learning-rate schedule of every trainer: linear warmup, then cosine to ``min_lr``, per step.

``conf/scheduler/*.yaml`` names ``warmup_cosine`` as ``_target_``. It is a ``LambdaLR`` over the
optimizer's groups (so layer-decay ratios hold) and resumes with the step count from a checkpoint.
The warmup is given in epochs (DeiT, SeiT, MAE) or as a share of all steps with a cap (the
tokenizer and TokenAdapt: 10%, at most 500 steps).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch


def warmup_cosine_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps(total: int, max_epochs: int | None, *, warmup_epochs: float | None = None,
                 warmup_fraction: float | None = None, max_warmup_steps: int | None = None) -> int:
    """Warmup length in optimizer steps: ``warmup_epochs`` epochs, or ``warmup_fraction`` of ``total``
    (capped at ``max_warmup_steps``)."""
    if warmup_fraction is not None:
        steps = int(total * warmup_fraction)
    else:
        steps = int((warmup_epochs or 0) * max(1, total // max(1, max_epochs or 1)))
    return min(steps, max_warmup_steps) if max_warmup_steps is not None else steps


def warmup_cosine(optimizer: torch.optim.Optimizer, trainer: pl.Trainer, *, min_lr: float = 0.0,
                  warmup_epochs: float | None = 1.0, warmup_fraction: float | None = None,
                  max_warmup_steps: int | None = None) -> dict:
    """Lightning's scheduler entry for ``optimizer``, stepped per optimizer step.

    ``min_lr`` is absolute: the cosine ends at min_lr / lr of each group's starting lr (groups
    under layer decay keep their ratio to the top group).
    """
    total = max(1, int(trainer.estimated_stepping_batches))
    warmup = warmup_steps(total, trainer.max_epochs, warmup_epochs=warmup_epochs,
                          warmup_fraction=warmup_fraction, max_warmup_steps=max_warmup_steps)
    top = max(group["lr"] for group in optimizer.param_groups)
    min_ratio = min(1.0, min_lr / top) if top > 0 else 0.0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total, warmup, min_ratio))
    return {"scheduler": schedule, "interval": "step", "name": "train/lr"}
