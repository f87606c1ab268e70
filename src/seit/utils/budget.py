"""Time-budgeted training: ``trainer.max_time`` counts training seconds only, and the run keeps a
curve of its validation metric against those seconds.

The benchmark of "Training a ViT from scratch in < 24 h with 1 GPU" (Irandoust et al., NeurIPS'22
HITY workshop) stops training after 24 h and reports top-1 against cumulative training hours. To
make budgets comparable across runs that validate or checkpoint more or less often, the clock here
leaves out what is not training:

- validation (per epoch, every ``val_every`` training seconds, and the sanity check before fit);
- checkpoint writing, as the trainer's checkpoint IO measures it
  (``seit.utils.checkpoint_io.AtomicCheckpointIO.save_seconds``; with another checkpoint IO it is
  counted as training, and ``excluded`` in the report says so).

Data loading, augmentation and the optimizer step count as training. ``TrainingBudget`` is
Lightning's ``Timer`` (which Lightning then does not add for ``Trainer(max_time=...)``) with that
clock, the same per-step stop and the same save/restore: the elapsed seconds, the curve and the
samples seen travel in the checkpoint, so ``ckpt_path=last`` continues the budget and the curve.
It is also the throughput clock of every run (``train_s``, ``samples_per_s`` in summary.json).

Under DDP, rank 0's clock is the one that counts: it is broadcast after every training batch, so
every rank stops, validates and reads the budget-horizon LR schedule (``seit.tasks.schedule``) at
the same step.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.trainer.states import RunningStage
from pytorch_lightning.utilities.data import extract_batch_size
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from seit.utils.summary import to_float

log = logging.getLogger(__name__)
DURATION = re.compile(r"(\d+):(\d\d):(\d\d):(\d\d)")
PHASES = ("train", "validation", "checkpoint")


def duration_seconds(value, key: str) -> float | None:
    """Seconds of a duration given as "DD:HH:MM:SS", a number of seconds, a timedelta or a dict of
    timedelta fields ({"hours": 24}); None stays None. ``key`` names the config key in errors.

    In a YAML file quote "DD:HH:MM:SS": YAML 1.1 reads an unquoted 1:00:00:00 as the base-60 number
    216000. On the command line (trainer.max_time=01:00:00:00) it is a string already."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, Mapping):
        try:
            seconds = timedelta(**dict(value)).total_seconds()
        except TypeError as e:
            raise ValueError(f"{key}={dict(value)} is not a duration: {e}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := DURATION.fullmatch(value.strip())):
        days, hours, minutes, secs = (int(g) for g in match.groups())
        seconds = timedelta(days=days, hours=hours, minutes=minutes, seconds=secs).total_seconds()
    else:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r} is not a duration: give DD:HH:MM:SS (e.g. 00:24:00:00) "
                             "or a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{key}={value!r}: a duration must be > 0 seconds (null: none)")
    return seconds


class TrainingBudget(Timer):
    """Stops training once ``max_time`` training seconds are spent, validates every ``val_every``
    training seconds besides each epoch's end, and records a curve point per validation.

    max_time: the budget ("DD:HH:MM:SS" or seconds; null: no budget, the clock still runs).
    val_every: training seconds between validations, on a fixed grid (val_every, 2 val_every, ...),
        besides Lightning's per-epoch validation; null: per epoch only. Needs
        ``trainer.check_val_every_n_epoch=1`` and a batch-count ``trainer.val_check_interval``.
    metric: the run's optimized metric; each curve point holds it, val/acc1, and their ``val_ema/``
        twins, as far as ``trainer.callback_metrics`` has them.

    When the budget stops a run mid-epoch, Lightning validates at that step (it validates whenever
    ``trainer.should_stop`` ends an epoch early), so the curve's last point scores the final weights;
    ``needs_final_validation`` tells the pipeline when that could not happen (a run stopped in an
    epoch that ``check_val_every_n_epoch`` skips).
    """

    def __init__(self, max_time=None, val_every=None, metric: str = "val/acc1", verbose: bool = True):
        self.max_time_s = duration_seconds(max_time, "trainer.max_time")
        self.val_every_s = duration_seconds(val_every, "callbacks.budget.val_every")
        super().__init__(duration=None if self.max_time_s is None else timedelta(seconds=self.max_time_s),
                         interval="step", verbose=verbose)
        self.metric = metric
        self.curve: list[dict] = []
        self.stopped_by_budget = False
        self.launch_samples = 0  # this rank, this launch
        self._restored = {"train": 0.0, "validation": 0.0, "checkpoint": 0.0, "samples": 0}
        self._launch = dict.fromkeys(PHASES, 0.0)
        self._phase: str | None = None  # "train" or "validation" while fitting
        self._mark = 0.0  # monotonic time and checkpoint-IO seconds when the phase's time was last booked
        self._mark_saved = 0.0
        self._checkpoint_io = None
        self._agreed_train_s = 0.0  # rank 0's training seconds at the last training batch's end
        self._next_validation_s = self.val_every_s
        self._held_val_check_batch = None
        self._point: dict = {}  # the curve point of the validation under way
        # the run's launches (a requeued SLURM job, a resumed run): earlier ones from the checkpoint
        self._segments: list[dict] = []
        self._launch_began = time.monotonic()
        self._launch_began_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._launch_steps = [0, 0]  # global step at this launch's first and latest training batch

    # -- the clock -------------------------------------------------------------------------
    def _saved_seconds(self) -> float:
        return getattr(self._checkpoint_io, "save_seconds", 0.0)

    @property
    def measures_checkpointing(self) -> bool:
        return hasattr(self._checkpoint_io, "save_seconds")

    def _book(self) -> None:
        """Book the time since the last mark into the current phase, checkpoint writes into their own."""
        now, saved = time.monotonic(), self._saved_seconds()
        if self._phase is not None:
            writing = saved - self._mark_saved
            self._launch["checkpoint"] += writing
            self._launch[self._phase] += max(0.0, now - self._mark - writing)
        self._mark, self._mark_saved = now, saved

    def _enter(self, phase: str | None) -> None:
        self._book()
        self._phase = phase

    @property
    def launch_train_seconds(self) -> float:
        """Training seconds of this launch (this process's fit), validation and checkpointing excluded."""
        self._book()
        return self._launch["train"]

    @property
    def train_seconds(self) -> float:
        """Training seconds of the whole run: restored from the checkpoint plus this launch's."""
        return self._restored["train"] + self.launch_train_seconds

    @property
    def validation_seconds(self) -> float:
        self._book()
        return self._restored["validation"] + self._launch["validation"]

    @property
    def checkpoint_seconds(self) -> float:
        self._book()
        return self._restored["checkpoint"] + self._launch["checkpoint"]

    @property
    def samples_seen(self) -> int:
        """Training samples of the whole run on this rank (a resumed run starts from rank 0's count)."""
        return self._restored["samples"] + self.launch_samples

    def spent(self) -> float:
        """Share of the budget spent, in [0, 1], as all ranks agree on it (rank 0's clock at the last
        training batch's end); what a budget-horizon LR schedule reads. Needs ``max_time``."""
        if self.max_time_s is None:
            raise ValueError("the training budget has no max_time (set trainer.max_time)")
        return min(1.0, self._agreed_train_s / self.max_time_s)

    def time_elapsed(self, stage: str = RunningStage.TRAINING) -> float:
        """Timer's query: for training, the budget's clock (validation and checkpointing excluded)."""
        if RunningStage(stage) == RunningStage.TRAINING:
            return self.train_seconds
        return super().time_elapsed(stage)

    # -- hooks -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checkpoint_io = trainer.strategy.checkpoint_io
        if self.val_every_s is not None and trainer.check_val_every_n_epoch != 1:
            raise ValueError(f"callbacks.budget.val_every needs trainer.check_val_every_n_epoch=1 "
                             f"(got {trainer.check_val_every_n_epoch}): interval validation runs in validating epochs")
        self._agreed_train_s = self.train_seconds  # the restored state is loaded by now
        if self.max_time_s is not None and self._agreed_train_s >= self.max_time_s:
            self._stop(trainer)  # resumed with the budget already spent

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.val_every_s is not None and not isinstance(trainer.val_check_batch, (int, float)):
            raise ValueError("callbacks.budget.val_every cannot be combined with a time-based "
                             "trainer.val_check_interval: give one of the two")
        self._define_wandb_axis(trainer)
        self._launch_steps = [trainer.global_step, trainer.global_step]
        self._enter("train")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._release_validation(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.launch_samples += extract_batch_size(batch)
        self._launch_steps[1] = trainer.global_step
        if self.max_time_s is None and self.val_every_s is None:
            return  # nothing to decide: no per-step broadcast
        self._agreed_train_s = float(trainer.strategy.broadcast(self.train_seconds, src=0))
        if self.max_time_s is not None and self._agreed_train_s >= self.max_time_s:
            self._stop(trainer)  # Lightning validates at this step, as for any early stop
        elif (self.val_every_s is not None and self._agreed_train_s >= self._next_validation_s
              and trainer.enable_validation and batch_idx + 1 < trainer.num_training_batches):
            self._request_validation(trainer, batch_idx)

    def on_validation_start(self, trainer, pl_module) -> None:
        super().on_validation_start(trainer, pl_module)
        if trainer.sanity_checking:
            return
        self._release_validation(trainer)
        if self._phase == "train":
            self._enter("validation")
        self._point = {"train_s": round(self.train_seconds, 3), "epoch": trainer.current_epoch,
                       "step": trainer.global_step}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        # every rank calls this hook, so the sum over ranks is safe here
        local = torch.tensor(float(self.samples_seen), dtype=torch.float64, device=pl_module.device)
        self._point["samples_seen"] = int(trainer.strategy.reduce(local, reduce_op="sum").item())
        # logged with the val metrics, in the same logger row: wandb charts them against budget/train_s
        pl_module.log("budget/train_s", self._point["train_s"])
        pl_module.log("budget/samples_seen", float(self._point["samples_seen"]))

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking:
            return
        point = self._point
        for key in self.recorded_metrics():
            if (value := to_float(trainer.callback_metrics.get(key))) is not None:
                point[key] = value
        self.curve.append(point)
        if self.val_every_s is not None:  # the next point of the fixed grid after this one
            self._next_validation_s = (math.floor(self._agreed_train_s / self.val_every_s) + 1) * self.val_every_s
        if self._phase == "validation":
            self._enter("train")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._release_validation(trainer)
        self._enter(None)

    def recorded_metrics(self) -> list[str]:
        """The metric names a curve point keeps: the optimized metric, val/acc1, and their EMA twins."""
        names = list(dict.fromkeys([self.metric, "val/acc1"]))
        twins = ["val_ema/" + n[len("val/"):] for n in names if n.startswith("val/")]
        return list(dict.fromkeys(names + twins))

    # -- interval validation -----------------------------------------------------------------
    def _request_validation(self, trainer: pl.Trainer, batch_idx: int) -> None:
        """Make Lightning validate after this batch. With ``check_val_every_n_epoch=1`` its epoch loop
        validates when (batch_idx + 1) % trainer.val_check_batch == 0; the epoch's own value is held
        and given back before the next batch (and at validation start), so its per-epoch validation
        is untouched. Lightning's time-based val_check_interval is not used: it measures wall time
        since the last validation and then skips the validation at each epoch's end."""
        if self._held_val_check_batch is None:
            self._held_val_check_batch = trainer.val_check_batch
        trainer.val_check_batch = batch_idx + 1

    def _release_validation(self, trainer: pl.Trainer) -> None:
        if self._held_val_check_batch is not None:
            trainer.val_check_batch = self._held_val_check_batch
            self._held_val_check_batch = None

    def _stop(self, trainer: pl.Trainer) -> None:
        trainer.should_stop = True
        if not self.stopped_by_budget and self._verbose:
            rank_zero_info(f"training budget spent: {self._agreed_train_s:.1f}s of training "
                           f"(max_time {timedelta(seconds=self.max_time_s)}, validation and checkpointing "
                           "excluded); stopping")
        self.stopped_by_budget = True

    def needs_final_validation(self, trainer: pl.Trainer) -> bool:
        """True when the budget stopped the run and no validation scored the final weights."""
        return (self.stopped_by_budget and trainer.enable_validation
                and not (self.curve and self.curve[-1]["step"] == trainer.global_step))

    def _define_wandb_axis(self, trainer: pl.Trainer) -> None:
        """wandb charts the val metrics against training seconds (budget/train_s), so that the runs of
        a group overlay on one time axis. The budget metrics are logged in the val metrics' row."""
        from pytorch_lightning.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                run = logger.experiment
                run.define_metric("budget/train_s")
                for pattern in ("val/*", "val_ema/*", "budget/samples_seen"):
                    run.define_metric(pattern, step_metric="budget/train_s")

    # -- report and checkpoint state -------------------------------------------------------------
    def report(self) -> dict:
        """The summary.json block: the budget and how its seconds were counted (whole run, all launches)."""
        excluded = ["validation"] + (["checkpointing"] if self.measures_checkpointing else [])
        return {"max_time_s": self.max_time_s, "train_seconds": round(self.train_seconds, 3),
                "excluded": excluded, "validation_s": round(self.validation_seconds, 3),
                "checkpoint_s": round(self.checkpoint_seconds, 3), "val_every_s": self.val_every_s,
                "stopped_by_budget": self.stopped_by_budget}

    def segments(self, wall_s: float | None = None) -> list[dict]:
        """The run's launches, earlier ones first: when each began (UTC), its wall seconds (up to its last
        checkpoint for an interrupted one; ``wall_s`` for this one, else until now), its training
        seconds, the global steps it went from and to, and its SLURM job id and restart count."""
        wall = time.monotonic() - self._launch_began if wall_s is None else wall_s
        this = {"began_at": self._launch_began_at, "wall_s": round(wall, 3),
                "train_s": round(self.launch_train_seconds, 3), "steps": list(self._launch_steps)}
        if "SLURM_JOB_ID" in os.environ:
            this.update(slurm_job_id=os.environ["SLURM_JOB_ID"],
                        slurm_restart=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
        return [*self._segments, this]

    def state_dict(self) -> dict:
        return {"train_s": self.train_seconds, "validation_s": self.validation_seconds,
                "checkpoint_s": self.checkpoint_seconds, "samples_seen": self.samples_seen,
                "curve": [dict(p) for p in self.curve], "segments": self.segments()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = {"train": float(state_dict["train_s"]), "validation": float(state_dict["validation_s"]),
                          "checkpoint": float(state_dict["checkpoint_s"]), "samples": int(state_dict["samples_seen"])}
        self._launch = dict.fromkeys(PHASES, 0.0)
        self.launch_samples = 0
        self.curve = [dict(p) for p in state_dict["curve"]]
        self._segments = [dict(s) for s in state_dict.get("segments", [])]  # none in older checkpoints
        if self.val_every_s is not None:  # this launch's val_every, from where the clock stands
            self._next_validation_s = (math.floor(self._restored["train"] / self.val_every_s) + 1) * self.val_every_s
        self._agreed_train_s = self._restored["train"]


def training_budget(callbacks: list, max_time) -> TrainingBudget:
    """The run's one ``TrainingBudget``: the configured one (``callbacks.budget``), or a new one for
    ``max_time`` (``trainer.max_time``) appended to ``callbacks`` when none is configured
    (``callbacks=none``), so a budget and the throughput clock work with any callback set."""
    found = [c for c in callbacks if isinstance(c, TrainingBudget)]
    if len(found) > 1:
        raise ValueError(f"{len(found)} TrainingBudget callbacks are configured; keep one (callbacks.budget)")
    if found:
        if found[0].max_time_s != duration_seconds(max_time, "trainer.max_time"):
            raise ValueError(f"callbacks.budget.max_time ({found[0].max_time_s}s) differs from trainer.max_time "
                             f"({max_time}): set trainer.max_time only (the callback's default follows it)")
        return found[0]
    budget = TrainingBudget(max_time=max_time)
    callbacks.append(budget)
    return budget
