"""``last.ckpt`` every N training steps, never between an epoch's last batch and its validation.

Lightning's ``ModelCheckpoint(every_n_train_steps=N)`` saves in ``on_train_batch_end``. When step N
falls on an epoch's last batch, that checkpoint comes before the epoch-end validation, and it records
the epoch's batches as all done. A run killed during that validation (a preemption, an OOM kill)
resumes from it and goes straight on to the next epoch: the epoch is never validated, so its
``val/*`` row and its say in the best checkpoint are lost. Here that one save waits for the
epoch's end (``on_train_epoch_end``, after the validation); a kill during the validation resumes
from the previous checkpoint and validates the epoch when it gets there.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for ``every_n_train_steps`` saves (same arguments), with the save due on an
    epoch's last batch made at the epoch's end instead."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._due_at_epoch_end = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or batch_idx + 1 >= trainer.num_training_batches:
            self._due_at_epoch_end = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._due_at_epoch_end:
            self._due_at_epoch_end = False
            super().on_train_batch_end(trainer, pl_module, None, None, -1)  # saves if the step is due
