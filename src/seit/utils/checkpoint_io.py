"""Atomic checkpoints: a kill -9 during a save leaves the previous last.ckpt intact.

Lightning's default checkpoint IO writes straight to the final path, so a job killed mid-write
(preemption, OOM killer) leaves a truncated last.ckpt that cannot be resumed from.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytorch_lightning.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)
