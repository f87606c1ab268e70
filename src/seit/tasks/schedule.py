"""Learning rates and schedules shared by every trainer (classifier, MTM, tokenizer, TokenAdapt).

The lr comes from ``optim.lr`` or from ``optim.blr`` scaled by the global batch; the schedule is a
per-step linear warmup then cosine, as a ``LambdaLR`` so it resumes with the step count.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def short_warmup_cosine(optimizer: torch.optim.Optimizer, total: int, optim: dict):
    """Per-step LambdaLR: warmup over 10% of the steps (at most 500), then cosine to optim.min_lr.

    For the auxiliary trainers (tokenizer, TokenAdapt), whose optim config gives an absolute lr.
    """
    total = max(1, total)
    min_ratio = min(1.0, float(optim.get("min_lr") or 0.0) / optim["lr"])
    warmup = min(total // 10, 500)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup, min_ratio))


def scaled_lr(optim: dict, global_batch: int) -> float:
    """``optim.lr`` if set, else ``optim.blr`` times global_batch / optim.base_batch, linearly
    (DeiT, SeiT, MAE) or by its square root (``lr_scaling: sqrt``, SeiT++ fine-tuning: blr*sqrt(B)/8)."""
    if optim.get("lr"):
        return float(optim["lr"])
    ratio = global_batch / float(optim.get("base_batch") or 512)
    rule = optim.get("lr_scaling") or "linear"
    if rule not in ("linear", "sqrt"):
        raise ValueError(f"optim.lr_scaling must be linear or sqrt, got {rule!r}")
    return float(optim["blr"]) * (ratio if rule == "linear" else math.sqrt(ratio))


def global_batch(module: pl.LightningModule, batch_size: int) -> int:
    """Samples per optimizer step over all ranks and accumulated batches."""
    if module._trainer is None:
        return batch_size
    return batch_size * module.trainer.world_size * module.trainer.accumulate_grad_batches


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, trainer: pl.Trainer, optim: dict, lr: float) -> dict:
    """Lightning's scheduler entry: per-step warmup over ``optim.warmup_epochs``, then cosine to ``optim.min_lr``."""
    total = int(trainer.estimated_stepping_batches)
    steps_per_epoch = max(1, total // max(1, trainer.max_epochs or 1))
    warmup = int(optim["warmup_epochs"] * steps_per_epoch)
    min_ratio = min(1.0, optim["min_lr"] / lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup, min_ratio))
    return {"scheduler": schedule, "interval": "step", "name": "train/lr"}
