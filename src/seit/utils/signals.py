"""Stop promptly on SIGTERM (SLURM's time limit, ``timeout``, ``kill``) or on SLURM's requeue
warning (``SIGUSR2`` under the submitit launcher), and leave a last.ckpt.

Lightning already catches SIGTERM in every setup: its handler only sets a flag, and the loops raise
``SIGTERMException`` at the next batch boundary. Two gaps remain, which this callback closes:

- nothing is saved: on that exception it writes ``last.ckpt`` (atomically, through the trainer's
  checkpoint IO) into the directory of each ``ModelCheckpoint`` that keeps a last checkpoint, so a
  relaunch with ``ckpt_path=last`` resumes from the step where the signal arrived;
- a run stuck between batches (a data loader waiting for a worker, a slow first batch) never reaches
  a boundary: ``grace_s`` seconds after the first SIGTERM, or at a second one, the process exits with
  status 143 (128 + SIGTERM) and one line on stderr, without a new checkpoint (the previous last.ckpt
  stays intact: saves are atomic). A stop that is already saving is left to finish.

The handler is installed at ``on_train_start``, after Lightning has restored the checkpoint and
registered its own SIGTERM handler (which it then calls): a SIGTERM that comes earlier, while a
resumed launch sets up, either ends the process at once (before Lightning's handler exists; the
checkpoint on disk is untouched) or is already flagged by Lightning, and starts the grace timer
here. (Installed at ``on_fit_start``, it once swallowed a SIGTERM that came during the restore:
Lightning had not registered yet, so no stop was flagged, training went on and the grace timer
killed it 20 s later without a checkpoint.)

The handler runs in Python's main thread; a hang inside C code that never returns to the interpreter
is beyond it (SLURM's SIGKILL after KillWait ends those).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)
EXIT_SIGTERM = 128 + signal.SIGTERM


class StopOnSigterm(Callback):
    """SIGTERM, and the SLURM requeue warning: save last.ckpt at the next batch boundary, then stop.

    ``requeue_signal`` (``SIGUSR2``, what the submitit launcher asks SLURM to send ``signal_delay_s``
    before the time limit, and what ``scancel --signal=USR2`` sends) is taken over from the handler
    already installed for it (submitit's), which otherwise requeues the job and exits at once,
    wherever training is: the relaunch then goes back to the last periodic checkpoint. Here the
    warning stops training like a SIGTERM (rank 0 flags it and Lightning passes the flag to every
    rank at the next step), every rank saves last.ckpt at that boundary, the loggers write their
    rows, and then submitit's handler requeues the job (rank 0) and exits. Without such a handler
    (no submitit) the signal is left alone.
    """

    def __init__(self, grace_s: float = 20.0, requeue_signal: str | None = "SIGUSR2"):
        self.grace_s = float(grace_s)
        self.requeue_signum = getattr(signal, requeue_signal) if requeue_signal else None
        self._previous = None
        self._requeue = None  # the requeue signal's own handler (submitit's), run after the save
        self._requeue_pending: tuple | None = None
        self._trainer: pl.Trainer | None = None
        self._installed = False
        self._signals = 0
        self._saving = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        if self.requeue_signum is not None and callable(signal.getsignal(self.requeue_signum)):
            self._requeue = signal.signal(self.requeue_signum, self._on_requeue_signal)
        self._installed = True
        if trainer.received_sigterm:  # flagged by Lightning's handler before this one was installed
            self._count()

    def _on_sigterm(self, signum, frame) -> None:
        if callable(self._previous):  # Lightning's: flags the stop for the loops
            self._previous(signum, frame)
        self._count()

    def _on_requeue_signal(self, signum, frame) -> None:
        log.info("%s: saving last.ckpt at the next batch, then requeueing", signal.Signals(signum).name)
        self._requeue_pending = (signum, frame)
        if self._trainer.is_global_zero:
            # Lightning's stop flag (no public setter): the loops stop at the next boundary, and
            # under DDP rank 0's flag is broadcast to every rank before each step
            self._trainer._signal_connector.received_sigterm = True
        self._count()

    def _count(self) -> None:
        self._signals += 1
        if self._signals > 1:
            _exit_now(f"a second signal after {self._cause()}")
        timer = threading.Timer(self.grace_s, self._on_timeout)
        timer.daemon = True
        timer.start()

    def _on_timeout(self) -> None:
        if not self._saving:
            self._hand_over_requeue()
            _exit_now(f"no batch boundary reached within {self.grace_s:g}s of {self._cause()}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        self._saving = True
        saved = []
        for path in last_checkpoint_paths(trainer):
            trainer.save_checkpoint(path)
            saved.append(str(path))
        exception.report = (f"stopped by {self._cause()} at step {trainer.global_step}; saved "  # run.py prints it
                            + (", ".join(saved) or "no checkpoint (no ModelCheckpoint with save_last)"))
        log.info(exception.report)
        if self._requeue_pending:
            for logger in trainer.loggers:  # submitit's handler exits: write the rows first
                logger.finalize("failed")
            self._hand_over_requeue()

    def _cause(self) -> str:
        return "the requeue signal" if self._requeue_pending else "SIGTERM"

    def _hand_over_requeue(self) -> None:
        """Run the requeue signal's own handler (submitit: ``scontrol requeue`` on rank 0, then
        ``sys.exit(-1)``; in the grace timer's thread that exit only ends the thread)."""
        if self._requeue_pending and callable(self._requeue):
            pending, self._requeue_pending = self._requeue_pending, None
            try:
                self._requeue(*pending)
            except SystemExit:
                if threading.current_thread() is threading.main_thread():
                    raise

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            if self._requeue is not None:
                signal.signal(self.requeue_signum, self._requeue)
            self._installed = False


def last_checkpoint_paths(trainer: pl.Trainer) -> list[Path]:
    """Where the run's ModelCheckpoints keep ``last.ckpt`` (one path per directory)."""
    paths = {Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
             for cb in trainer.checkpoint_callbacks
             if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath}
    return sorted(paths)


def _exit_now(why: str) -> None:
    sys.stderr.write(f"error: stopped ({why}); no new checkpoint, the last one saved is kept\n")
    sys.stderr.flush()
    os._exit(EXIT_SIGTERM)
