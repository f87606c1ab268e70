"""The learning-rate schedule of every trainer: linear warmup, then cosine to ``min_lr``, per step.

``conf/scheduler/*.yaml`` names ``warmup_cosine`` as ``_target_``. It is a ``LambdaLR`` over the
optimizer's groups (so layer-decay ratios hold) and resumes with the step count from a checkpoint.
The warmup is given in epochs (DeiT, SeiT, MAE) or as a share of all steps with a cap (the
tokenizer and TokenAdapt: 10%, at most 500 steps).

The cosine runs over one of two horizons (``horizon``):

- ``epochs``: the nominal ``trainer.max_epochs`` x steps per epoch. A time-budgeted run that stops
  earlier (``trainer.max_time``) ends part-way down the cosine, as in the 24 h / 1 GPU benchmark
  (Irandoust et al. 2022: cosine over 300 epochs, training stopped at 24 h);
- ``budget``: the training time budget itself, progress = training seconds / ``trainer.max_time``
  (the ``TrainingBudget`` clock: validation and checkpointing excluded), so the LR reaches
  ``min_lr`` as the budget runs out whatever the speed of the machine (budget-aware schedules,
  Li et al., ICLR 2020). A resumed run continues from the checkpoint's training seconds.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from seit.utils.budget import TrainingBudget

HORIZONS = ("epochs", "budget")


def cosine_factor(progress: float, min_ratio: float) -> float:
    """Cosine from 1 (progress 0) down to ``min_ratio`` (progress >= 1)."""
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine down to ``min_ratio`` over the remaining steps."""
    if step < warmup:
        return (step + 1) / warmup
    return cosine_factor((step - warmup) / max(1, total - warmup), min_ratio)


def budget_cosine_factor(step: int, warmup: int, spent: float, min_ratio: float) -> float:
    """LR multiplier over a time budget: the cosine of ``spent`` (share of the budget spent, 0..1),
    capped by the linear warmup over ``warmup`` steps. The cap keeps the LR continuous without
    remembering when the warmup ended (a resumed run needs nothing but the budget's clock); the peak
    is the cosine's value where the warmup line meets it, ~1 when the warmup is a small part of the budget."""
    ramp = (step + 1) / warmup if step < warmup else 1.0
    return min(ramp, cosine_factor(spent, min_ratio))


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
                  max_warmup_steps: int | None = None, horizon: str = "epochs") -> dict:
    """Lightning's scheduler entry for ``optimizer``, stepped per optimizer step.

    ``min_lr`` is absolute: the cosine ends at min_lr / lr of each group's starting lr (groups
    under layer decay keep their ratio to the top group). ``horizon``: ``epochs`` or ``budget`` (see
    the module doc); the warmup is counted in steps in both. Raises ValueError for another horizon,
    or for ``budget`` without a time budget (``trainer.max_time``).
    """
    if horizon not in HORIZONS:
        raise ValueError(f"scheduler.horizon={horizon!r} must be one of {HORIZONS}")
    if math.isinf(trainer.estimated_stepping_batches):
        raise ValueError("the LR schedule needs a step count: set trainer.max_epochs or trainer.max_steps (with "
                         "trainer.max_time too: a nominal count that the budget cuts short)")
    total = max(1, int(trainer.estimated_stepping_batches))
    warmup = warmup_steps(total, trainer.max_epochs, warmup_epochs=warmup_epochs,
                          warmup_fraction=warmup_fraction, max_warmup_steps=max_warmup_steps)
    top = max(group["lr"] for group in optimizer.param_groups)
    min_ratio = min(1.0, min_lr / top) if top > 0 else 0.0
    if horizon == "budget":
        budget = next((c for c in trainer.callbacks if isinstance(c, TrainingBudget)), None)
        if budget is None or budget.max_time_s is None:
            raise ValueError("scheduler.horizon=budget needs a time budget: set trainer.max_time "
                             "(DD:HH:MM:SS, e.g. 00:24:00:00), or use scheduler.horizon=epochs")
        factor = lambda step: budget_cosine_factor(step, warmup, budget.spent(), min_ratio)  # noqa: E731
    else:
        factor = lambda step: warmup_cosine_factor(step, total, warmup, min_ratio)  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": schedule, "interval": "step", "name": "train/lr"}
