"""What a user wants to see of a run: its tokens decoded back to images, and where it errs.

``RunVisuals`` writes PNGs into the run dir (``val_tokens_decoded.png`` at the start,
``confusion_matrix.png`` at the end, and for MTM pre-training ``mtm_predictions.png`` after
every validation) and logs the same images to wandb when it is a logger. It decodes with the
dataset's tokenizer, so it lives here, above the tokenizers, with the pipelines that add it to a
trainer (``conf/callbacks/default.yaml``); the drawing itself is ``utils.visuals``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image
from pytorch_lightning import Callback
from pytorch_lightning.loggers import WandbLogger

from seit.tokenizers import load_tokenizer
from seit.utils.visuals import confusion_png, image_grid, masked_view

log = logging.getLogger(__name__)


class RunVisuals(Callback):
    def __init__(self, num_samples: int = 32):
        self.num_samples = num_samples
        self.tokenizer = None
        self.preview_ids = None

    def _log(self, trainer, key: str, path: Path, caption: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[str(path)], caption=[caption])

    def on_fit_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        if not trainer.is_global_zero or not hasattr(dm, "load_info"):
            return
        ckpt = dm.load_info().meta.get("tokenizer", {}).get("checkpoint")
        if not ckpt or not Path(ckpt).is_file():
            log.info("no tokenizer checkpoint recorded for this dataset: not decoding samples")
            return
        batch = next(iter(dm.stream(dm.cfg.val_split, train=False)))
        ids = batch["ids"][: self.num_samples].long()
        self.tokenizer, self.preview_ids = load_tokenizer(ckpt), ids[:8]
        with torch.inference_mode():
            images = self.tokenizer.decode(ids)
        path = Path(trainer.default_root_dir) / "val_tokens_decoded.png"
        Image.fromarray(image_grid(images)).save(path)
        classes = dm.load_info().classes
        caption = ", ".join(classes[i] if 0 <= i < len(classes) else "?" for i in batch["label"][: self.num_samples].tolist())
        self._log(trainer, "val/tokens_decoded", path, caption)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """MTM: rows of (tokens, masked input, masked tokens predicted), decoded by the tokenizer."""
        if (self.tokenizer is None or not hasattr(pl_module, "predict_masked") or not trainer.is_global_zero
                or trainer.sanity_checking):
            return
        ids, token_mask, filled = (t.cpu() for t in pl_module.predict_masked(self.preview_ids))
        with torch.inference_mode():
            original, predicted = self.tokenizer.decode(ids), self.tokenizer.decode(filled)
        rows = torch.cat([original, masked_view(original, token_mask), predicted])
        path = Path(trainer.default_root_dir) / "mtm_predictions.png"
        Image.fromarray(image_grid(rows, cols=len(ids))).save(path)
        self._log(trainer, "val/mtm_predictions", path,
                  f"epoch {trainer.current_epoch}: tokens / masked / predicted")

    def on_fit_end(self, trainer, pl_module) -> None:
        matrix = getattr(pl_module, "last_confusion", None)
        if matrix is None or not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        classes = dm.load_info().classes if hasattr(dm, "load_info") else getattr(dm, "classes", [])
        path = Path(trainer.default_root_dir) / "confusion_matrix.png"
        confusion_png(matrix, classes or [str(i) for i in range(len(matrix))], path)
        self._log(trainer, "val/confusion_matrix", path, "rows: true class, columns: predicted")
