"""A resume from last.ckpt must go on exactly where the run stopped; this closes one gap in Lightning.

Lightning 2.6 (``FitLoop.reset``): resuming from a checkpoint written at ``on_train_batch_end`` of
an epoch's *last* batch (``ModelCheckpoint(every_n_train_steps=...)`` landing on an epoch's end)
completes that epoch's counters but leaves the loop's restart stage at "mid epoch". The next epoch
then starts without counting itself as started and without ``on_train_epoch_start`` (so the data's
epoch is not set). A mid-epoch checkpoint of that next epoch reads as a finished epoch, and the
launch that resumes from it replays the epoch from its first batch: the run ends with extra steps
(seen as 1353 steps for 1350 after three SLURM requeues).
"""

from __future__ import annotations

import pytorch_lightning as pl


def finish_restart_at_epoch_end(trainer: pl.Trainer) -> bool:
    """Clear the fit loop's stale "restarted mid epoch" stage when the restored epoch has in fact
    been completed by the restore, so the next epoch starts (and is counted) normally. Call it from
    ``on_train_start`` (after ``FitLoop.reset``, before the first epoch starts). Returns whether it
    changed anything."""
    fit = trainer.fit_loop
    current = fit.epoch_progress.current
    if fit.restarted_mid_epoch and current.ready == current.started == current.processed == current.completed:
        fit.reset_restart_stage()
        return True
    return False
