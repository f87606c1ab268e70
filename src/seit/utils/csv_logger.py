"""A CSVLogger whose ``metrics.csv`` survives a resume.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts, so a run resumed from
last.ckpt (after a kill, a preemption, a requeue) keeps only the rows logged after the resume. This
one keeps the file and appends. Of the earlier rows it drops those at or after the first step that
the resumed run logs: they were logged after the checkpoint it resumed from, and the resumed run
logs those steps again. The rows buffered in memory are written out whenever a checkpoint is saved,
so a kill -9 loses none of the rows that came before the checkpoint the run resumes from.
"""

from __future__ import annotations

import csv
import io

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

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


class AppendingWriter(ExperimentWriter):
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

