"""Atomic checkpoints, and checkpoint errors that name the file.

Lightning's default checkpoint IO writes straight to the final path, so a job killed mid-write
(preemption, OOM killer) leaves a truncated last.ckpt that cannot be resumed from; here a kill -9
during a save leaves the previous last.ckpt intact. torch and safetensors report a truncated file
("failed finding central directory", "MetadataIncompleteBuffer") or a full disk ("file write
failed") without saying which file; ``unreadable`` and the save below add it.

The checkpoint IO also keeps the seconds it has spent writing (``save_seconds``), so that a time
budget (``seit.utils.budget.TrainingBudget``) can leave checkpointing out of training time.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pytorch_lightning.plugins.io import TorchCheckpointIO

from seit.utils.io import atomic_path


class CheckpointError(ValueError):
    pass


@contextmanager
def unreadable(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Around reading the checkpoint ``path``: a failure says which file (``what``: the config key or role)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what}: {path} not found")
    try:
        yield
    except (ValueError, FileNotFoundError):  # ours, which name the file already
        raise
    except Exception as e:  # torch, zip, pickle and safetensors each have their own error types
        size = Path(path).stat().st_size
        raise CheckpointError(f"{what}: {path} ({size} bytes) cannot be read, truncated or not a checkpoint? "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


class AtomicCheckpointIO(TorchCheckpointIO):
    def __init__(self) -> None:
        super().__init__()
        self.save_seconds = 0.0  # wall seconds spent in save_checkpoint by this process, failed saves included

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        start = time.monotonic()
        try:
            with atomic_path(path) as tmp:
                super().save_checkpoint(checkpoint, tmp, storage_options)
        except (OSError, RuntimeError) as e:  # a full disk: torch says "file write failed", not where
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
            raise OSError(getattr(e, "errno", None), f"cannot write checkpoint {path}: {reason}") from e
        finally:
            self.save_seconds += time.monotonic() - start

    def load_checkpoint(self, path, *args, **kwargs):
        with unreadable(path, "checkpoint"):
            return super().load_checkpoint(path, *args, **kwargs)
