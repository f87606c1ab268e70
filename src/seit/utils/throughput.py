"""Training throughput for any task: samples and seconds spent in training epochs, validation excluded."""

from __future__ import annotations

import time

import torch
from pytorch_lightning import Callback


def batch_size(batch) -> int:
    if isinstance(batch, dict):
        batch = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    return int(batch.shape[0])


class TrainThroughput(Callback):
    def __init__(self):
        self.samples = 0
        self.seconds = 0.0
        self._epoch_start: float | None = None
        self._val_start = 0.0
        self._val_seconds = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start, self._val_seconds = time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += batch_size(batch)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_start is not None:  # validation inside a training epoch is not training time
            self._val_seconds += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_start is not None:
            self.seconds += time.perf_counter() - self._epoch_start - self._val_seconds
        self._epoch_start = None
