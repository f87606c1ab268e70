"""metrics.csv holds every row up to a checkpoint the moment that checkpoint is on disk."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from seit.utils.csv_logger import ResumableCSVLogger, StepRowBeforeCheckpoint


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CsvAtEachSave(TorchCheckpointIO):
    """What metrics.csv holds right after each checkpoint file is written: what a kill -9 there leaves."""

    def __init__(self, csv_path: Path, key: str = "train/loss"):
        self.csv_path, self.key, self.seen = csv_path, key, []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        super().save_checkpoint(checkpoint, path, storage_options)
        self.seen.append((checkpoint["global_step"], train_steps(self.csv_path, self.key)))


def train_steps(path: Path, key: str = "train/loss") -> list[int]:
    if not path.exists():
        return []
    with open(path) as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get(key)]


def values(path: Path) -> list[tuple[str, str, str]]:
    """Every (step, key, value) of metrics.csv, however it is split into rows."""
    with open(path) as f:
        return sorted((r["step"], k, v) for r in csv.DictReader(f) for k, v in r.items() if v and k != "step")


def fit(root: Path, *, row_first: bool, accumulate: int = 1, log_every: int = 1, module=Regression,
        prefix: str = "") -> CsvAtEachSave:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(20, 3), torch.randn(20, 1))
    logger = ResumableCSVLogger(save_dir=root, name="csv", version="", prefix=prefix)
    io = CsvAtEachSave(root / "csv" / "metrics.csv", f"{prefix}-train/loss" if prefix else "train/loss")
    callbacks = [ModelCheckpoint(dirpath=root / "ckpt", save_top_k=0, save_last=True, every_n_train_steps=2)]
    if row_first:
        callbacks.append(StepRowBeforeCheckpoint())
    trainer = pl.Trainer(max_epochs=2, accumulate_grad_batches=accumulate, log_every_n_steps=log_every,
                         logger=logger, callbacks=callbacks, plugins=[io], enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module(), torch.utils.data.DataLoader(data, batch_size=2))
    return io


@pytest.mark.parametrize("accumulate,log_every", [(1, 1), (2, 1), (1, 2)])
def test_each_checkpoint_finds_its_steps_rows_on_disk_and_no_row_is_written_twice(tmp_path, accumulate, log_every):
    io = fit(tmp_path / "fixed", row_first=True, accumulate=accumulate, log_every=log_every)
    steps = 20 // 2 // accumulate * 2
    logged = [s for s in range(steps) if (s + 1) % log_every == 0]
    assert [g for g, _ in io.seen] == list(range(2, steps + 1, 2))
    for global_step, rows in io.seen:
        assert rows == [s for s in logged if s < global_step], global_step
    final = (tmp_path / "fixed" / "csv" / "metrics.csv").read_text()
    assert train_steps(tmp_path / "fixed" / "csv" / "metrics.csv") == logged

    plain = fit(tmp_path / "plain", row_first=False, accumulate=accumulate, log_every=log_every)
    assert (tmp_path / "plain" / "csv" / "metrics.csv").read_text() == final  # the same rows, the same values
    late = [(g, rows) for g, rows in plain.seen if rows != [s for s in logged if s < g]]
    assert late, "without the callback, some checkpoint lands before its step's row (the gap this closes)"


class LogsLate(Regression):
    """Logs in its on_train_batch_end, which Lightning calls after the checkpoint callbacks', and
    writes to its logger directly there, at another step."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.log("train/late", float(self.global_step))
        self.logger.log_metrics({"direct": 1.0}, step=1000 + self.global_step)


class LogsStep(Regression):
    def training_step(self, batch, batch_idx):
        self.log("step", float(10 * self.global_step))  # the row's step, as Lightning reads it
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("case", ["late", "step", "prefix"])
def test_the_rows_written_first_have_the_values_lightning_logs(tmp_path, case):
    kwargs = {"late": {"module": LogsLate}, "step": {"module": LogsStep}, "prefix": {"prefix": "p"}}[case]
    fixed, plain = (fit(tmp_path / str(first), row_first=first, **kwargs) for first in (True, False))
    assert values(tmp_path / "True" / "csv" / "metrics.csv") == values(tmp_path / "False" / "csv" / "metrics.csv")
    if case != "step":  # the loss rows of the steps before each checkpoint are on disk at its write
        assert [rows for _, rows in fixed.seen] == [list(range(g)) for g, _ in fixed.seen]
        assert [rows for _, rows in plain.seen] != [list(range(g)) for g, _ in plain.seen]
