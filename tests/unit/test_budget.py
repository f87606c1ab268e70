"""The training-time budget: a clock without validation and checkpoint writes, a stop at the budget
with a last validation, interval validation besides each epoch's end, save/restore of the budget and
its curve, and the cosine over the budget. Real Lightning fits of a 2x2 linear model whose steps
sleep a few tens of ms, so the seconds are known."""

from __future__ import annotations

import gc
import math
import time
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from seit.tasks.schedule import budget_cosine_factor, cosine_factor, warmup_cosine
from seit.utils.budget import TrainingBudget, duration_seconds, training_budget
from seit.utils.checkpoint_io import AtomicCheckpointIO

TRAIN_STEP_S = 0.02
BATCHES = 10  # per epoch
SLACK_S = 0.1  # Lightning's own work around the steps (a few ms each; more on a loaded machine)


class Sleepy(pl.LightningModule):
    """Training steps take TRAIN_STEP_S, validation batches val_step_s; val/acc1 = 0.5."""

    def __init__(self, val_step_s: float = 0.0, scheduler: dict | None = None):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)
        self.val_step_s = val_step_s
        self.scheduler = scheduler
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        time.sleep(TRAIN_STEP_S)
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_step_s)
        self.log("val/acc1", 0.5)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": warmup_cosine(optimizer, self.trainer, **self.scheduler)}


def loader(n: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 2)), batch_size=1)


def fit(budget: TrainingBudget, model: Sleepy, tmp_path, *, max_epochs: int = 10, ckpt_path=None,
        every_n_train_steps: int | None = None, **trainer_args) -> pl.Trainer:
    callbacks = [budget]
    if every_n_train_steps:  # as conf/callbacks/default.yaml: last.ckpt every n steps and at each epoch's end
        callbacks += [ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True, enable_version_counter=False,
                                      every_n_train_steps=every_n_train_steps),
                      ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True, enable_version_counter=False)]
    trainer = pl.Trainer(callbacks=callbacks, plugins=[AtomicCheckpointIO()], logger=False,
                         enable_checkpointing=bool(every_n_train_steps), enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=max_epochs, num_sanity_val_steps=0,
                         default_root_dir=tmp_path, **trainer_args)
    trainer.fit(model, loader(BATCHES), loader(2), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(autouse=True)
def no_collector_pauses():
    """A full collection of the pytest process (~500k objects) pauses 0.1-0.3 s: as long as the
    margins these timed fits leave."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.fixture
def slow_checkpoints(monkeypatch):
    """Every checkpoint write takes 0.15 s more (inside the IO that AtomicCheckpointIO times)."""
    write = TorchCheckpointIO.save_checkpoint

    def slow(self, *args, **kwargs):
        time.sleep(0.15)
        write(self, *args, **kwargs)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", slow)


def test_clock_excludes_validation_and_checkpoint_writes(tmp_path, slow_checkpoints):
    budget = TrainingBudget()
    start = time.monotonic()
    trainer = fit(budget, Sleepy(val_step_s=0.15), tmp_path, max_epochs=1, every_n_train_steps=3)
    wall = time.monotonic() - start
    steps = BATCHES * TRAIN_STEP_S  # 0.2 s of training; 0.3 s of validation and 3 x 0.15 s of writes besides
    assert trainer.global_step == BATCHES and budget.samples_seen == BATCHES
    assert budget.validation_seconds >= 0.3 and budget.checkpoint_seconds >= 3 * 0.15  # at steps 3, 6, 9
    assert steps <= budget.train_seconds < steps + 2 * SLACK_S
    assert budget.train_seconds + budget.validation_seconds + budget.checkpoint_seconds <= wall
    assert budget.report()["excluded"] == ["validation", "checkpointing"]


def test_budget_stops_training_and_the_last_validation_scores_the_final_weights(tmp_path):
    # epoch 0 (0.2 s of steps) must end inside the budget, on a loaded machine too (at 0.3 s it once
    # did not, beside two CPU hogs); 18 steps make 0.36 s, so the stop still falls in epoch 1
    budget = TrainingBudget(max_time=0.36)
    trainer = fit(budget, Sleepy(), tmp_path)
    assert budget.stopped_by_budget
    assert 0.36 <= budget.train_seconds < 0.36 + TRAIN_STEP_S + SLACK_S  # stops at the step that crosses it
    assert trainer.global_step < 2 * BATCHES  # ~16 steps: stopped mid-way through the 2nd epoch
    assert [p["step"] for p in budget.curve] == [BATCHES, trainer.global_step]  # epoch end, then the stop
    assert budget.curve[-1]["val/acc1"] == 0.5 and budget.curve[-1]["samples_seen"] == trainer.global_step
    assert not budget.needs_final_validation(trainer)


def test_a_stop_in_an_epoch_without_validation_asks_for_the_final_one(tmp_path):
    budget = TrainingBudget(max_time=0.1)  # stops in epoch 0, which check_val_every_n_epoch=3 does not validate
    trainer = fit(budget, model := Sleepy(), tmp_path, check_val_every_n_epoch=3)
    assert budget.stopped_by_budget and budget.curve == [] and budget.needs_final_validation(trainer)
    trainer.validate(model, loader(2), verbose=False)  # what the pipeline then does
    assert [p["step"] for p in budget.curve] == [trainer.global_step] and not budget.needs_final_validation(trainer)
    with pytest.raises(ValueError, match="callbacks.budget.val_every needs trainer.check_val_every_n_epoch=1"):
        fit(TrainingBudget(val_every=1), Sleepy(), tmp_path, check_val_every_n_epoch=3)


def test_val_every_validates_on_a_grid_of_training_seconds_and_at_each_epoch_end(tmp_path):
    # epochs of 0.2 s (two mid-epoch points each); the budget leaves two epochs room to take twice
    # that on a loaded machine (at 0.5 s, the second epoch's end once fell after the stop)
    budget = TrainingBudget(max_time=0.8, val_every=0.07)
    trainer = fit(budget, Sleepy(val_step_s=0.05), tmp_path)
    steps = [p["step"] for p in budget.curve]
    assert {BATCHES, 2 * BATCHES} <= set(steps)  # every epoch end
    mid = [p for p in budget.curve if p["step"] % BATCHES]
    assert len(mid) >= 5  # 0.07, 0.14, 0.21, ... and the stop at ~0.8
    times = [p["train_s"] for p in budget.curve]
    assert times == sorted(times)
    for k in range(1, math.floor(times[-1] / 0.07) + 1):  # each grid point 0.07 k is scored within a step
        assert any(0.07 * k <= t < 0.07 * k + TRAIN_STEP_S + SLACK_S / 2 for t in times), (k, times)
    assert trainer.val_check_batch == BATCHES  # the epoch's own value was given back


def test_resume_continues_the_budget_the_curve_and_the_cosine(tmp_path):
    schedule = {"horizon": "budget", "warmup_epochs": 0, "min_lr": 0.0}
    first = TrainingBudget(max_time=0.6)
    fit(first, Sleepy(scheduler=schedule), tmp_path, every_n_train_steps=1, max_steps=15)  # "killed" at step 15
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["TrainingBudget"]
    assert 15 * TRAIN_STEP_S <= state["train_s"] < 0.6 and len(state["curve"]) == 1  # safe-loadable

    resumed, model = TrainingBudget(max_time=0.6), Sleepy(scheduler=schedule)
    trainer = fit(resumed, model, tmp_path, ckpt_path=tmp_path / "last.ckpt", every_n_train_steps=1)
    assert resumed.stopped_by_budget and 0.6 <= resumed.train_seconds < 0.6 + TRAIN_STEP_S + SLACK_S
    assert resumed.launch_train_seconds < 0.6 - state["train_s"] + TRAIN_STEP_S + SLACK_S  # only the rest
    assert resumed.curve[:1] == state["curve"] and resumed.curve[-1]["step"] == trainer.global_step  # whole curve
    assert resumed.samples_seen == trainer.global_step
    # the resumed cosine goes on from where the first launch left it (half the budget spent), not from 1;
    # each LR reads the clock of one step before (within a step: 0.03 of the cosine here)
    assert model.lrs[0] == pytest.approx(cosine_factor(state["train_s"] / 0.6, 0.0), abs=0.1)
    assert all(b <= a for a, b in zip(model.lrs, model.lrs[1:])) and model.lrs[-1] < 0.05
    # the launches are listed: the first as its checkpoint saw it, then this one, steps joined end to start
    (seg1,), (a, b) = state["segments"], resumed.segments()
    assert a == seg1 and a["steps"] == [0, 15] and b["steps"] == [15, trainer.global_step]
    assert 0 < a["train_s"] <= a["wall_s"] and 0 < b["train_s"] <= b["wall_s"]


def test_cosine_over_the_budget():
    assert budget_cosine_factor(step=50, warmup=0, spent=0.5, min_ratio=0.1) == pytest.approx(0.55)
    assert budget_cosine_factor(step=50, warmup=0, spent=1.0, min_ratio=0.1) == pytest.approx(0.1)
    assert budget_cosine_factor(step=0, warmup=10, spent=0.0, min_ratio=0.0) == pytest.approx(0.1)  # warmup line
    assert budget_cosine_factor(step=5, warmup=10, spent=0.9, min_ratio=0.0) == pytest.approx(cosine_factor(0.9, 0))

    budget = TrainingBudget(max_time="00:00:01:40")  # 100 s
    trainer = SimpleNamespace(estimated_stepping_batches=1000, max_epochs=10, callbacks=[budget])
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=2.0)
    scheduler = warmup_cosine(optimizer, trainer, warmup_epochs=0, min_lr=0.0, horizon="budget")["scheduler"]
    budget._agreed_train_s = 25.0  # what rank 0's clock said at the last batch's end
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * cosine_factor(0.25, 0.0))


def test_budget_horizon_without_max_time_names_the_keys():
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    for callbacks in ([], [TrainingBudget()]):
        trainer = SimpleNamespace(estimated_stepping_batches=100, max_epochs=10, callbacks=callbacks)
        with pytest.raises(ValueError, match=r"scheduler\.horizon=budget needs .*trainer\.max_time"):
            warmup_cosine(optimizer, trainer, horizon="budget")


def test_durations_and_the_one_budget_callback():
    assert duration_seconds("00:24:00:00", "k") == 86400 and duration_seconds(300, "k") == 300
    assert duration_seconds({"minutes": 5}, "k") == 300 and duration_seconds(None, "k") is None
    with pytest.raises(ValueError, match="trainer.max_time='24h' is not a duration"):
        TrainingBudget(max_time="24h")
    callbacks = []
    added = training_budget(callbacks, "00:00:00:08")  # callbacks=none: the pipeline adds one
    assert callbacks == [added] and added.max_time_s == 8
    assert training_budget(callbacks, 8) is added
    with pytest.raises(ValueError, match="differs from trainer.max_time"):
        training_budget(callbacks, None)
