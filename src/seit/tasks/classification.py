"""Supervised classification on tokens (SeiT) or pixels (the baseline), one LightningModule.

Hyperparameters are plain dicts and scalars, so a checkpoint loads with ``weights_only=True``.
Augmentation runs here, on the device, batched (``seit.augment.pipeline``): the loader only
decodes. Its random draws come from a generator seeded by (seed, rank, step), so a resumed run
augments every step as the uninterrupted run did.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torchmetrics
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.utils import ModelEmaV3

from seit.augment.pipeline import AugConfig, augment_pixels, augment_tokens, eval_view, step_seed
from seit.data.dataset_info import DatasetError
from seit.models.vit import TokenViT
from seit.tasks.schedule import global_batch, scaled_lr, warmup_cosine_schedule

INPUT_KEYS = {"tokens": "ids", "pixels": "images"}


class ClassificationTask(pl.LightningModule):
    def __init__(self, model: dict, optim: dict, aug: dict, num_classes: int, input_grid: int, batch_size: int,
                 codebook_sha256: str | None = None, label_smoothing: float = 0.1, ema_decay: float = 0.0,
                 compile: bool = False, seed: int = 0, linear_probe: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.input_key = INPUT_KEYS[model["input"]]
        self.aug = AugConfig.from_dict(aug)
        self.crop = int(self.aug.crop) if self.aug.crop else input_grid
        if self.crop > input_grid:
            raise ValueError(f"aug.crop={self.crop} is larger than the {input_grid} input grid")
        self.aug.crop = self.crop
        if self.input_key == "images" and (self.aug.eda["replace_prob"] or self.aug.eda["swap_prob"]
                                           or self.aug.noise["prob"] or self.aug.color_adapt["prob"]):
            raise ValueError("Token-EDA, Emb-Noise and ColorAdapt work on tokens; the pixel baseline takes aug=deit")
        model_args = {k: v for k, v in model.items() if k not in ("name", "pretrained")}
        self.model = TokenViT(input_size=self.crop, num_classes=num_classes, **model_args)
        if linear_probe:  # only the pooled features' LayerNorm and the linear head learn
            self.model.requires_grad_(False)
            for part in (self.model.vit.fc_norm, self.model.vit.head):
                part.requires_grad_(True)
        self.ema = ModelEmaV3(self.model, decay=ema_decay) if ema_decay > 0 else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)  # val loss, on labels
        self.soft_criterion = nn.CrossEntropyLoss()  # train loss, on soft targets that hold the smoothing
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
        self.register_buffer("synonyms", None, persistent=False)  # [K, k] from the dataset, for Token-EDA
        self.tokenadapt = None  # a frozen TokenAdapt for half the batch (aug.tokenadapt.checkpoint)
        self._generator: torch.Generator | None = None

    # -- data on the device -------------------------------------------------------------------
    def step_generator(self) -> torch.Generator:
        """The augmentation RNG of this step: a function of (seed, rank, global step) only."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(step_seed(self.hparams.seed, self.global_rank, self.global_step))
        return self._generator

    def train_batch(self, batch: dict, num_classes: int | None = None, aug: AugConfig | None = None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented input map, soft targets over ``num_classes``, default all)."""
        h, labels = self.hparams, batch["label"]
        classes, aug, g = num_classes or h.num_classes, aug or self.aug, generator or self.step_generator()
        if self.input_key == "ids":
            return augment_tokens(batch["ids"], labels, self.model.embed, aug, classes,
                                  h.label_smoothing, self.synonyms, g, adapt=self.tokenadapt)
        return augment_pixels(batch["images"], labels, self.model.embed, aug, classes, h.label_smoothing, g)

    def load_tokenadapt(self, path: str) -> None:
        """Install a trained TokenAdapt, frozen; it must share the dataset's codebook."""
        from seit.tasks.tokenadapt import load_tokenadapt

        self.tokenadapt = load_tokenadapt(path, self.hparams.codebook_sha256)

    def load_synonyms(self, synonyms: torch.Tensor | None) -> None:
        if synonyms is None and self.aug.eda["replace_prob"] > 0:
            raise DatasetError("aug.eda.replace_prob > 0 needs the dataset's synonym table; this dataset has none "
                               "(tokenize it with data.build.synonyms_k > 0)")
        self.synonyms = synonyms.long() if synonyms is not None else None

    def load_pretrained(self, path: str) -> None:
        """Start from a pre-trained MTM encoder (``model.pretrained``; task=pretrain_mtm)."""
        from seit.tasks.mtm import load_encoder_into

        load_encoder_into(self.model, path, self.hparams.codebook_sha256)
        if self.ema is not None:
            self.ema.module.load_state_dict(self.model.state_dict())

    def train(self, mode: bool = True):
        """A linear probe keeps the frozen body in eval mode (no dropout or drop-path on features)."""
        super().train(mode)
        if self.hparams.linear_probe:
            self.model.eval()
        return self

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

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Refuse unlabelled samples (label -1), which the loss and metrics fail on with an index error.

        Checked here, on the host: on the device the check would wait for the GPU every step.
        """
        labels = batch.get("label") if isinstance(batch, dict) else None
        if labels is not None and len(labels) and labels.min() < 0:
            stage = "training" if self.trainer.training else "validation"
            raise DatasetError(f"{int((labels < 0).sum())} of the {len(labels)} samples of a {stage} batch have "
                               f"label -1: the {stage} split holds unlabelled samples, and classification needs a "
                               "label on every sample (unlabelled data suits task=pretrain_mtm and task=embed)")
        return batch

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if self.input_key == "ids" and dm is not None and hasattr(dm, "load_info"):
            info = dm.load_info()
            self.check_codebook(info.fingerprint, f"the dataset {info.root}")

    # -- steps --------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, targets = self.train_batch(batch)
        loss = self.soft_criterion(self.model(x), targets)
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
        x = eval_view(self.model.embed(batch[self.input_key]), self.aug)
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
        return scaled_lr(self.hparams.optim, global_batch(self, self.hparams.batch_size))

    def configure_optimizers(self):
        o = self.hparams.optim
        lr = self.learning_rate()
        if o.get("layer_decay"):  # BEiT/MAE fine-tuning: block i of L gets lr * decay^(L - i)
            vit = self.model.vit
            groups = param_groups_layer_decay(vit, o["weight_decay"], vit.no_weight_decay(), layer_decay=o["layer_decay"])
            for group in groups:
                group["lr"] = lr * group.pop("lr_scale", 1.0)
        else:
            groups = param_groups_weight_decay(self.model, o["weight_decay"], self.model.no_weight_decay())
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(o["betas"]), eps=o["eps"])
        return {"optimizer": optimizer, "lr_scheduler": warmup_cosine_schedule(optimizer, self.trainer, o, lr)}
