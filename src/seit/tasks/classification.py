"""Supervised classification on tokens (SeiT) or pixels (the baseline), one LightningModule.

Hyperparameters are plain dicts and scalars, so a checkpoint loads with ``weights_only=True``.
Augmentation runs here, on the device, batched: the loader only decodes.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torchmetrics
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3

from seit.augment.crop import center_crop, random_crop, random_hflip
from seit.data.dataset_info import DatasetError
from seit.models.vit import TokenViT

INPUT_KEYS = {"tokens": "ids", "pixels": "images"}


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ClassificationTask(pl.LightningModule):
    def __init__(self, model: dict, optim: dict, aug: dict, num_classes: int, input_grid: int, batch_size: int,
                 codebook_sha256: str | None = None, label_smoothing: float = 0.1, ema_decay: float = 0.0,
                 compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.input_key = INPUT_KEYS[model["input"]]
        self.crop = int(aug["crop"]) if aug.get("crop") else input_grid
        if self.crop > input_grid:
            raise ValueError(f"aug.crop={self.crop} is larger than the {input_grid} input grid")
        model_args = {k: v for k, v in model.items() if k != "name"}
        self.model = TokenViT(input_size=self.crop, num_classes=num_classes, **model_args)
        self.ema = ModelEmaV3(self.model, decay=ema_decay) if ema_decay > 0 else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        top5 = min(5, num_classes)
        self.val_metrics = nn.ModuleDict({
            prefix: torchmetrics.MetricCollection({
                "acc1": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=1),
                "acc5": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=top5),
            }) for prefix in (["val"] + (["val_ema"] if self.ema is not None else []))
        })
        # torchmetrics sync across ranks at compute(), never per step: ranks may run uneven val batches
        self.val_loss = torchmetrics.MeanMetric()
        self.val_count = torchmetrics.SumMetric()  # samples evaluated over all ranks: exactly the val split
        self.val_confusion = torchmetrics.ConfusionMatrix(task="multiclass", num_classes=num_classes)
        self.last_confusion = None  # numpy [C, C] of the latest validation, for plots

    # -- data on the device -------------------------------------------------------------------
    def embed(self, batch: dict, train: bool) -> torch.Tensor:
        x = self.model.embed(batch[self.input_key])
        if train:
            x = random_crop(x, self.crop)
            if self.hparams.aug.get("hflip", 0) > 0:
                x = random_hflip(x, self.hparams.aug["hflip"])
            return x
        return center_crop(x, self.crop)

    def load_codebook(self, codebook: torch.Tensor) -> None:
        """Install the dataset's frozen codebook (in the EMA copy too)."""
        self.model.embed.load_codebook(codebook)
        if self.ema is not None:
            self.ema.module.embed.load_codebook(codebook)

    def check_codebook(self, expected: str, where: str) -> None:
        """Raise if the model's codebook is not the one the dataset was tokenized with."""
        if self.input_key != "ids":
            return
        own = self.model.embed.fingerprint
        if own != expected:
            raise DatasetError(f"codebook mismatch: {where} was tokenized with codebook {expected[:12]}…, but the "
                               f"model (or checkpoint) holds codebook {own[:12]}…; re-tokenize or pick a matching checkpoint")

    def configure_model(self) -> None:
        """Optionally torch.compile the ViT body in place (parameter names, hence checkpoints, unchanged)."""
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.model.vit.compile()
            self._compiled = True

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if self.input_key == "ids" and dm is not None and hasattr(dm, "load_info"):
            info = dm.load_info()
            self.check_codebook(info.fingerprint, f"the dataset {info.root}")

    # -- steps --------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(self.embed(batch, train=True))
        loss = self.criterion(logits, batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["label"].shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def on_train_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    def on_validation_epoch_end(self) -> None:
        self._log_val_metrics()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = self.embed(batch, train=False)
        labels = batch["label"]
        logits = self.model(x)
        self.val_loss.update(self.criterion(logits, labels), weight=labels.shape[0])
        self.val_count.update(labels.shape[0])
        self.val_confusion.update(logits, labels)
        self.val_metrics["val"].update(logits, labels)
        if self.ema is not None:
            self.val_metrics["val_ema"].update(self.ema.module(x), labels)

    def _log_val_metrics(self) -> None:
        # Values are already reduced over ranks by torchmetrics; sync_dist only silences Lightning.
        self.log("val/loss", self.val_loss.compute(), sync_dist=True)
        self.log("val/samples", self.val_count.compute(), sync_dist=True)
        self.last_confusion = self.val_confusion.compute().cpu().numpy()
        self.val_loss.reset()
        self.val_count.reset()
        self.val_confusion.reset()
        for prefix, metrics in self.val_metrics.items():
            for name, value in metrics.compute().items():
                self.log(f"{prefix}/{name}", value, prog_bar=name == "acc1" and prefix == "val", sync_dist=True)
            metrics.reset()

    # -- optimisation -------------------------------------------------------------------------
    def learning_rate(self) -> float:
        """``optim.lr`` if set, else ``optim.blr`` scaled linearly by the global batch over 512 (SeiT/DeiT)."""
        o = self.hparams.optim
        if o.get("lr"):
            return float(o["lr"])
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        world = self.trainer.world_size if self._trainer is not None else 1
        return float(o["blr"]) * self.hparams.batch_size * world * accumulate / 512

    def configure_optimizers(self):
        o = self.hparams.optim
        groups = param_groups_weight_decay(self.model, o["weight_decay"], self.model.no_weight_decay())
        lr = self.learning_rate()
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(o["betas"]), eps=o["eps"])
        total = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = int(o["warmup_epochs"] * steps_per_epoch)
        min_ratio = min(1.0, o["min_lr"] / lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "train/lr"}}
