"""PeriodicCheckpoint: a save due on an epoch's last batch comes after that epoch's validation."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO

from seit.utils.periodic_checkpoint import PeriodicCheckpoint


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.validations = 0

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        return None

    def on_validation_end(self):
        if not self.trainer.sanity_checking:
            self.validations += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Saves(TorchCheckpointIO):
    """(global step, validations done) at each checkpoint write."""

    def __init__(self, model: Regression):
        self.model, self.seen = model, []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        super().save_checkpoint(checkpoint, path, storage_options)
        self.seen.append((checkpoint["global_step"], self.model.validations))


def loader(n: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(n, 3), torch.randn(n, 1)), batch_size=2)


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("limit", [None, 4])
def test_a_save_due_on_an_epochs_last_batch_waits_for_its_validation_and_the_others_stay(tmp_path, validate, limit):
    model = Regression()
    io = Saves(model)
    every = 4 if limit else 5  # due on each epoch's last batch, and (limit=None) mid-epoch too: step 4 of 5 is not due
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=limit, logger=False, plugins=[io],
                         callbacks=[PeriodicCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True,
                                                       every_n_train_steps=every)],
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         num_sanity_val_steps=0)
    trainer.fit(model, loader(10), loader(4) if validate else None)
    per_epoch = limit or 5
    assert [step for step, _ in io.seen] == [per_epoch * e for e in (1, 2, 3)]
    if validate:
        assert [done for _, done in io.seen] == [1, 2, 3]  # after the epoch's validation, not before


def test_saves_inside_an_epoch_are_made_at_their_batch(tmp_path):
    model = Regression()
    io = Saves(model)
    trainer = pl.Trainer(max_epochs=2, logger=False, plugins=[io], num_sanity_val_steps=0,
                         callbacks=[PeriodicCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True,
                                                       every_n_train_steps=2)],
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, loader(10), loader(4))  # 5 steps an epoch: saves at 2, 4 | 6, 8 | 10 at the end
    assert io.seen == [(2, 0), (4, 0), (6, 1), (8, 1), (10, 2)]
