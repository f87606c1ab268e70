"""A test-only callback that signals its own process at one Lightning hook, from a given step: a
SIGKILL after a checkpoint, or a SIGTERM while a resumed launch restores, exactly where a test needs
it. Added with ``+callbacks.signal_at._target_=signal_at.SignalAt`` and this dir on PYTHONPATH."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    def __init__(self, hook: str, signal_name: str, step: int = 0):
        self.signum = getattr(signal, signal_name)
        self.step = step
        setattr(self, hook, self._fire)

    def _fire(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), self.signum)


def signal_at(hook: str, signal_name: str, step: int = 0) -> list[str]:
    """The overrides that add the callback."""
    return ["+callbacks.signal_at._target_=signal_at.SignalAt", f"+callbacks.signal_at.hook={hook}",
            f"+callbacks.signal_at.signal_name={signal_name}", f"+callbacks.signal_at.step={step}"]
