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
    data = torch.utils.data.TensorDataset(torch.randn(n, 3), torch.randn(n, 1))
    return torch.utils.data.DataLoader(data, batch_size=2)


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


class Killed(Exception):
    """A kill -9 during a validation: no hook after it runs, no checkpoint."""


class KilledInValidation(Regression):
    def __init__(self, at_step: int | None):
        super().__init__()
        self.at_step, self.validated_at = at_step, []

    def on_validation_start(self):
        if not self.trainer.sanity_checking and self.trainer.global_step == self.at_step:
            raise Killed

    def on_validation_end(self):
        super().on_validation_end()
        self.validated_at.append(self.trainer.global_step)


def fit_validating_twice_an_epoch(root, kill_at: int | None = None, ckpt_path=None) -> list[int]:
    torch.manual_seed(0)
    model = KilledInValidation(kill_at)
    every_2 = PeriodicCheckpoint(dirpath=root, save_top_k=0, save_last=True, every_n_train_steps=2)
    trainer = pl.Trainer(max_epochs=2, val_check_interval=0.5, logger=False, num_sanity_val_steps=0, callbacks=[every_2],
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    try:
        trainer.fit(model, loader(8), loader(4), ckpt_path=ckpt_path)
    except Killed:
        pass
    return model.validated_at


def test_a_kill_during_a_validation_inside_the_epoch_resumes_before_it(tmp_path):
    assert fit_validating_twice_an_epoch(tmp_path / "ref") == [2, 4, 6, 8]  # 4 steps an epoch, 2 validations
    assert fit_validating_twice_an_epoch(tmp_path / "run", kill_at=6) == [2, 4]
    last = tmp_path / "run" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4  # the save due at step 6 waited
    assert fit_validating_twice_an_epoch(tmp_path / "run", ckpt_path=last) == [6, 8]  # step 6 validated after all


def test_a_monitor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="leave monitor unset"):
        PeriodicCheckpoint(dirpath=tmp_path, monitor="val/acc1", every_n_train_steps=2)
