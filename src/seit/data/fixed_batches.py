"""FixedBatches: train and validate on the same few batches, every epoch (``data.fixed_batches=N``).

``debug=overfit`` uses it to check that a model can memorise a handful of samples: if top-1 on
them does not reach ~100%, the model, the loss or the data path is broken. Lightning's own
``trainer.overfit_batches`` does not do that here: the training loaders are streams that reshuffle
every epoch, so its "first N batches" are other samples each epoch.

The wrapper takes the first ``num_batches`` batches of the wrapped module's train loader once
(epoch 0, the training view: crops and other augmentation still happen in the task), keeps them
in memory, and serves exactly those batches, in the same order, as the train loader of every
epoch and as the val loader. ``set_epoch()`` is a no-op (the batches were drawn at epoch 0);
everything else (``load_info()``, ``num_classes``, ``cfg``, ...) is the wrapped module's, so the
tasks and callbacks that read ``trainer.datamodule`` see the dataset they were built for.
"""

from __future__ import annotations

import itertools
import logging

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


class _Batches(Dataset):
    """A list of ready batches; a DataLoader with ``batch_size=None`` yields them one by one."""

    def __init__(self, batches: list):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return self.batches[i]


def _detach(batch):
    """A copy that owns its memory (a loader may reuse its buffers), on the CPU."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().clone()
    if isinstance(batch, dict):
        return {k: _detach(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_detach(v) for v in batch)
    return batch


class FixedBatches(pl.LightningDataModule):
    def __init__(self, datamodule: pl.LightningDataModule, num_batches: int):
        if int(num_batches) < 1:
            raise ValueError(f"data.fixed_batches={num_batches} must be >= 1 (or null to train on the whole split)")
        super().__init__()
        self.datamodule = datamodule
        self.num_batches = int(num_batches)
        self.batches: list | None = None

    def __getattr__(self, name: str):
        # called only for what the wrapper itself does not have: the wrapped module's attributes
        inner = self.__dict__.get("datamodule")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    # -- Lightning hooks ----------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.setup(stage)

    def set_epoch(self, epoch: int) -> None:
        """The wrapped stream's epoch is not advanced: the batches were drawn once, at epoch 0."""

    def fixed(self) -> list:
        """The batches, drawn on first use from the wrapped module's train loader at epoch 0."""
        if self.batches is None:
            inner = self.datamodule
            inner.trainer = self.trainer  # its rank and world size, for a sharded stream
            if hasattr(inner, "set_epoch"):
                inner.set_epoch(0)
            self.batches = [_detach(b) for b in itertools.islice(iter(inner.train_dataloader()), self.num_batches)]
            if not self.batches:
                raise ValueError("data.fixed_batches: the train loader yielded no batch")
            if len(self.batches) < self.num_batches:
                log.warning("data.fixed_batches=%d: the train loader has only %d batches; using those",
                            self.num_batches, len(self.batches))
            sizes = [len(b["label"]) if isinstance(b, dict) and "label" in b else "?" for b in self.batches]
            log.info("data.fixed_batches: training and validating on the same %d batches (%s samples)",
                     len(self.batches), "+".join(map(str, sizes)))
        return self.batches

    def _loader(self) -> DataLoader:
        return DataLoader(_Batches(self.fixed()), batch_size=None, shuffle=False, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()


def fixed_batches(datamodule: pl.LightningDataModule, num_batches: int | None) -> pl.LightningDataModule:
    """``datamodule`` itself when ``num_batches`` is null, else wrapped to serve its first ``num_batches``."""
    return datamodule if num_batches is None else FixedBatches(datamodule, num_batches)
