"""A CSVLogger whose ``metrics.csv`` survives a resume.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts, so a run resumed from
last.ckpt (after a kill, a preemption, a requeue) keeps only the rows logged after the resume. This
one keeps the file and appends. Of the earlier rows it drops those at or after the first step that
the resumed run logs: they were logged after the checkpoint it resumed from, and the resumed run
logs those steps again.

A kill -9 must lose none of the step rows up to the checkpoint the run resumes from. Lightning saves
a step's checkpoint in ``on_train_batch_end`` and logs that step's row only afterwards, so the
``StepRowBeforeCheckpoint`` callback writes the row first, as part of the checkpoint's save, and the
writer then leaves the values written already out of the row that Lightning logs for the same step.
(An epoch's row, of ``on_epoch=True`` training metrics, still comes after the epoch-end checkpoints:
computing it early would all-reduce under DDP, on rank 0 only.)
"""

from __future__ import annotations

import csv
import io

import pytorch_lightning as pl
from lightning_fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning_fabric.utilities.logger import _add_prefix
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from seit.utils.io import atomic_open


class ResumableCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.save()

    @rank_zero_only
    def log_step_ahead(self, metrics: dict[str, float], step: int) -> None:
        """Write a training step's row now (before the checkpoint that includes the step); the row
        that Lightning logs for ``step`` next leaves out the values written here."""
        metrics = _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR)
        self.experiment.log_metrics(metrics, step)
        self.experiment.logged_ahead = (step, dict(metrics))
        self.save()

    @rank_zero_only
    def forget_step_ahead(self) -> None:
        self.experiment.logged_ahead = None


class StepRowBeforeCheckpoint(pl.Callback):
    """Write the current training step's metrics row to every ``ResumableCSVLogger`` when a checkpoint
    is saved inside ``on_train_batch_end`` (Lightning's ModelCheckpoint with ``every_n_train_steps``,
    or any callback that saves there): without it, a kill between the checkpoint's write and the row's
    loses that row for good, since the resumed run starts at the next step.

    It mirrors the conditions under which Lightning's logger connector logs the step right after the
    hook (``update_train_step_metrics``), so the row is the one Lightning would have written, less the
    values logged in ``on_train_batch_end`` (the LightningModule's runs after the checkpoint is saved:
    Lightning writes those in its own row). Only step rows: an epoch's row (``on_epoch=True``) is still
    logged after the epoch-end checkpoints.
    """

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, ResumableCSVLogger)]
        if not loggers or not trainer.is_global_zero or not trainer.training:
            return
        batches = trainer.fit_loop.epoch_loop.batch_progress.current
        if batches.processed == batches.completed:  # between batches: the last one's row is logged
            return
        if trainer.fit_loop._should_accumulate() and pl_module.automatic_optimization:
            return
        connector = trainer._logger_connector  # no public access to the step's pending metrics
        if not (connector.should_update_logs or trainer.fast_dev_run):
            return
        late = {result.meta.forked_name(True) for _, result in trainer._results.valid_items()
                if result.meta.fx == "on_train_batch_end"}
        metrics = {k: v for k, v in convert_tensors_to_scalars(connector.metrics["log"]).items() if k not in late}
        if not metrics:
            return
        step = metrics.pop("step", None)  # as the connector: a logged "step" is the row's step, else ...
        if step is None:
            metrics.setdefault("epoch", trainer.current_epoch)  # ... the epoch is added
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in loggers:
            logger.log_step_ahead(metrics, int(step))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._forget(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forget(trainer)  # Lightning's own copy of the row came before

    @staticmethod
    def _forget(trainer: pl.Trainer) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.forget_step_ahead()


class AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        self.logged_ahead: tuple[int, dict[str, float]] | None = None  # (step, row) written before Lightning's
        super().__init__(log_dir)

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if self.logged_ahead is not None and step == self.logged_ahead[0]:
            written = self.logged_ahead[1]
            self.logged_ahead = None
            metrics_dict = {k: v for k, v in metrics_dict.items() if k not in written or written[k] != v}
            if not metrics_dict:
                return
        super().log_metrics(metrics_dict, step)

    def _check_log_dir_exists(self) -> None:
        """Read the rows of a previous start instead of deleting them (the base class deletes)."""
        self._earlier: list[dict] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                reader = csv.DictReader(f)
                self._earlier = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def save(self) -> None:
        try:
            self._save()
        except OSError as e:  # a full disk: the OS error names no file
            raise OSError(e.errno, f"cannot write {self.metrics_file_path}: {e.strerror or e}") from e

    def _save(self) -> None:
        if self._earlier is not None and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            kept = [r for r in self._earlier if r.get("step") and int(float(r["step"])) < first]
            with atomic_open(self.metrics_file_path) as f:
                text = io.TextIOWrapper(f, encoding="utf-8", newline="")
                writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
                text.detach()  # flushes; atomic_open closes, syncs and renames the file
            self._earlier = None
        super().save()

