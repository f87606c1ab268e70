"""Progress output: a live tqdm bar on a terminal, plain lines in batch logs.

Redrawn bars turn a SLURM or CI log into megabytes of carriage returns, so when stdout is not
a TTY the run prints one line every ``every`` steps and one after each validation instead.
"""

from __future__ import annotations

import sys
import time

from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar


class LineProgress(ProgressBar):
    def __init__(self, every: int = 50):
        super().__init__()
        self.every = max(1, every)
        self._enabled = True
        self._start = time.perf_counter()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(f"[{time.perf_counter() - self._start:8.1f}s] {text}", flush=True)

    @staticmethod
    def _fmt(metrics: dict) -> str:
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                        if k != "v_num")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or batch_idx + 1 == self.total_train_batches:
            total = self.total_train_batches
            self._print(trainer, f"epoch {trainer.current_epoch} batch {batch_idx + 1}/{total} step {step} "
                        + self._fmt(self.get_metrics(trainer, pl_module)))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
            self._print(trainer, f"epoch {trainer.current_epoch} validation " + self._fmt(val))


def progress_bar(refresh_rate: int = 10, every: int = 50) -> ProgressBar:
    """A tqdm bar when stdout is a terminal, else LineProgress."""
    return TQDMProgressBar(refresh_rate=refresh_rate) if sys.stdout.isatty() else LineProgress(every=every)
