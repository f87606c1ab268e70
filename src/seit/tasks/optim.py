"""The optimizer of every trainer: timm's ``create_optimizer_v2`` at a learning rate scaled by the batch.

``conf/optim/*.yaml`` names this function as ``_target_``; the task calls it with the module (or
parameters) to train and the global batch, which only the trainer knows. timm builds the parameter
groups: no weight decay on biases, norms and the module's ``no_weight_decay()`` names, and with
``layer_decay`` (BEiT/MAE fine-tuning) block i of L trains at lr * decay^(L - i) through the
module's ``group_matcher``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from timm.optim import create_optimizer_v2

LR_SCALING = ("linear", "sqrt")


def scaled_lr(*, lr: float | None, blr: float | None, base_batch: int | None, lr_scaling: str | None,
              global_batch: int) -> float:
    """``lr`` if set, else ``blr`` times global_batch / base_batch, linearly (DeiT, SeiT, MAE) or by
    its square root (``lr_scaling=sqrt``; SeiT++ fine-tuning: blr * sqrt(B / 64))."""
    if lr:
        return float(lr)
    if not blr:
        raise ValueError("optim needs lr (absolute) or blr (per base_batch samples)")
    rule = lr_scaling or "linear"
    if rule not in LR_SCALING:
        raise ValueError(f"optim.lr_scaling must be one of {LR_SCALING}, got {rule!r}")
    ratio = global_batch / float(base_batch or 512)
    return float(blr) * (ratio if rule == "linear" else math.sqrt(ratio))


def create_optimizer(model_or_params: torch.nn.Module | Iterable, *, global_batch: int, opt: str = "adamw",
                     lr: float | None = None, blr: float | None = None, base_batch: int | None = 512,
                     lr_scaling: str | None = "linear", weight_decay: float = 0.0, layer_decay: float | None = None,
                     betas: tuple[float, float] | list[float] | None = None, eps: float | None = None,
                     **kwargs) -> torch.optim.Optimizer:
    """A timm optimizer (``opt``: adamw, adam, sgd, lamb, ...) for a module or a parameter list.

    With ``layer_decay`` each group's lr is set to lr * its layer's scale here, so any
    ``torch.optim.lr_scheduler`` (which scales the groups' initial lr) keeps the layer ratios.
    """
    rate = scaled_lr(lr=lr, blr=blr, base_batch=base_batch, lr_scaling=lr_scaling, global_batch=global_batch)
    extra = dict(kwargs)
    if betas is not None:
        extra["betas"] = tuple(betas)
    if eps is not None:
        extra["eps"] = eps
    optimizer = create_optimizer_v2(model_or_params, opt=opt, lr=rate, weight_decay=weight_decay,
                                    layer_decay=layer_decay, **extra)
    for group in optimizer.param_groups:
        group["lr"] = rate * group.pop("lr_scale", 1.0)
    return optimizer
