"""FixedBatches (data.fixed_batches, debug=overfit): the same batches every epoch, for train and val."""

from __future__ import annotations

import pytorch_lightning as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from seit.data.fixed_batches import FixedBatches, fixed_batches


class Shuffled(pl.LightningDataModule):
    """A stand-in for a stream: another order every time its train loader is iterated."""

    def __init__(self):
        super().__init__()
        self.epochs, self.setups = [], []

    def setup(self, stage=None):
        self.setups.append(stage)

    @property
    def num_classes(self) -> int:
        return 7

    def load_info(self):
        return "info"

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def train_dataloader(self):
        ds = TensorDataset(torch.arange(40), torch.arange(40) % 7)
        return DataLoader(ds, batch_size=4, shuffle=True, collate_fn=lambda rows: {
            "ids": torch.stack([r[0] for r in rows]), "label": torch.stack([r[1] for r in rows])})


def ids(loader) -> list[list[int]]:
    return [b["ids"].tolist() for b in loader]


def test_the_same_batches_every_epoch_and_for_validation():
    inner = Shuffled()
    dm = FixedBatches(inner, 3)
    dm.setup("fit")
    first = ids(dm.train_dataloader())
    assert len(first) == 3 and all(len(b) == 4 for b in first)
    for epoch in range(1, 3):
        dm.set_epoch(epoch)  # not forwarded: the stream would reshuffle, the fixed batches stay
        assert ids(dm.train_dataloader()) == first
    assert ids(dm.val_dataloader()) == first
    assert inner.epochs == [0] and inner.setups == ["fit"]
    assert ids(inner.train_dataloader()) != ids(inner.train_dataloader())  # the wrapped loader does reshuffle


def test_what_the_tasks_read_is_the_wrapped_modules():
    inner = Shuffled()
    dm = fixed_batches(inner, 2)
    assert dm.num_classes == 7 and dm.load_info() == "info" and hasattr(dm, "load_info")
    assert not hasattr(dm, "classes")  # absent on the wrapped module: absent here (hasattr checks stay honest)
    assert fixed_batches(inner, None) is inner
    with pytest.raises(ValueError, match="fixed_batches=0"):
        FixedBatches(inner, 0)
