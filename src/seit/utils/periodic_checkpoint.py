"""``last.ckpt`` every N training steps, never between a batch and the validation that follows it.

Lightning's ``ModelCheckpoint(every_n_train_steps=N)`` saves in ``on_train_batch_end``. When step N
is a batch that a validation follows (an epoch's last batch, a ``val_check_interval``, the budget's
``val_every`` grid, a stop), that checkpoint comes before the validation, and it records the batch
as done. A run killed during that validation (a preemption, an OOM kill) resumes from it past the
validation, which never happens: its ``val/*`` row, its curve point and its say in the best
checkpoint are lost. Here that one save waits for the validation's end (an epoch's last batch: for
the epoch's end, after its validation); a kill during the validation resumes from the previous
checkpoint and validates when it gets there again.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for ``every_n_train_steps`` saves, same arguments but no ``monitor`` (the
    best checkpoint is another callback's job), with a save due on a batch that a validation follows
    made after that validation (``train_time_interval`` saves are made as Lightning makes them).

    Raises:
        ValueError: ``monitor`` is set.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.monitor is not None:
            raise ValueError(f"PeriodicCheckpoint saves every N steps, not the best by {self.monitor!r}: "
                             "leave monitor unset (callbacks.model_checkpoint keeps the best)")
        self._waiting: str | None = None  # a due save waits for "validation" (inside the epoch) or "epoch end"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._every_n_train_steps < 1 or trainer.global_step % self._every_n_train_steps:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # no step save due
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        waiting = None
        if epoch_loop.batch_progress.is_last_batch or batch_idx + 1 >= trainer.num_training_batches:
            waiting = "epoch end"  # its validation comes before on_train_epoch_end
        elif epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            # Lightning's own test for a validation after this batch; the callbacks before this one
            # have run (the budget's val_every grid and its stop are in it)
            waiting = "validation"
        # every rank saves at the same point (the save is collective), so rank 0's view decides: a
        # time-based val_check_interval reads each rank's clock
        self._waiting = trainer.strategy.broadcast(waiting)
        if self._waiting is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._waiting == "validation":
            self._save_waiting(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._waiting:  # the epoch's last batch, or a validation that did not come after all
            self._save_waiting(trainer, pl_module)

    def _save_waiting(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._waiting = None
        super().on_train_batch_end(trainer, pl_module, None, None, -1)  # saves if the step is due
