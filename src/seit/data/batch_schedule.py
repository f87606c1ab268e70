"""A training batch size that follows the epoch: what a curriculum's batch-size steps need.

Irandoust et al. 2022 (``--decrease-batch-size``) shrink the batch as the images grow, so a step
keeps fitting in memory and the early, small-image epochs take more steps. A data module mixes
this in and builds its training loader with ``train_batch_size()``; the task installs the
schedule (``set_batch_schedule``) and has the trainer rebuild the loader every epoch.
"""

from __future__ import annotations

from typing import Callable


class BatchSchedule:
    """Mixin for a ``LightningDataModule`` whose ``cfg.batch_size`` is the default training batch."""

    batch_schedule: Callable[[int], int | None] | None = None

    def set_batch_schedule(self, schedule: Callable[[int], int | None] | None) -> None:
        """``schedule(epoch)``: the per-device training batch of that epoch (None: ``data.batch_size``)."""
        self.batch_schedule = schedule

    def train_batch_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        if self.batch_schedule is not None and trainer is not None:
            scheduled = self.batch_schedule(trainer.current_epoch)
            if scheduled is not None:
                return int(scheduled)
        return int(self.cfg.batch_size)
