"""Supervised classification on tokens (SeiT) or pixels (the baseline), one LightningModule.

Hyperparameters are plain dicts and scalars, so a checkpoint loads with ``weights_only=True``.
Augmentation runs here, on the device, batched (``seit.augment.pipeline``): the loader only
decodes. Its random draws come from a generator seeded by (seed, rank, step), so a resumed run
augments every step as the uninterrupted run did.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics
from pytorch_lightning.utilities import rank_zero_info

from seit.augment.pipeline import AugConfig, augment_pixels, augment_tokens, eval_view
from seit.data.dataset_info import DatasetError
from seit.models.export import CLASSIFIER_FILE, load_encoder_into, load_tokenadapt, save_classifier
from seit.tasks.base import SeitTask, build_model
from seit.tasks.curriculum import GridCurriculum
from seit.tokenizers.codebook_tools import synonyms

INPUT_KEYS = {"tokens": "ids", "pixels": "images"}
DEFAULT_SYNONYMS_K = 5  # data.build.synonyms_k's default, for datasets built without a table


class ClassificationTask(SeitTask):
    """``model``: a ``conf/model`` config (``_target_``: a classifier such as ``TokenViT``), built here
    with the sizes the data decides (classes, codebook, crop grid). ``model.pretrained``: an MTM
    export whose encoder starts the body. ``curriculum``: a grid-size curriculum (``task.curriculum``,
    ``seit.tasks.curriculum``): the training crop grows with the epoch."""

    needs_labels = True  # every sample of both splits (the pipeline checks dataset.json's record first)

    def __init__(self, *, model: dict, aug: dict, data: dict, optim: dict, scheduler: dict | None = None,
                 label_smoothing: float = 0.1, ema_decay: float = 0.0, compile: bool = False, seed: int = 0,
                 linear_probe: bool = False, curriculum: dict | None = None):
        super().__init__(data=data, optim=optim, scheduler=scheduler, seed=seed, ema_decay=ema_decay, compile=compile)
        facts = self.data
        if (model["input"] == "tokens") != (facts.kind == "tokens"):
            raise ValueError(f"model.input={model['input']!r} does not fit data.kind={facts.kind!r}")
        if facts.num_classes < 2:
            raise ValueError(f"the dataset has {facts.num_classes} classes; classification needs labelled images "
                             "(class subfolders)")
        self.input_key = INPUT_KEYS[model["input"]]
        self.aug = AugConfig.from_dict(aug)
        self.crop = int(self.aug.crop) if self.aug.crop else facts.input_grid
        if self.crop > facts.input_grid:
            raise ValueError(f"aug.crop={self.crop} is larger than the {facts.input_grid} input grid")
        self.aug.crop = self.crop
        if self.input_key == "images" and (self.aug.eda["replace_prob"] or self.aug.eda["swap_prob"]
                                           or self.aug.noise["prob"] or self.aug.color_adapt["prob"]):
            raise ValueError("Token-EDA, Emb-Noise and ColorAdapt work on tokens; the pixel baseline takes aug=deit")
        if self.input_key == "ids" and (pixel_only := self.aug.pixel_only()):
            raise ValueError(f"aug.{', aug.'.join(pixel_only)}: RandAugment, random erasing and repeated augmentation "
                             "work on pixels; tokens take Token-EDA, Token-RRC and Emb-Noise (aug=seit)")
        sizes = {"codebook_size": facts.codebook_size, "codebook_dim": facts.codebook_dim} if facts.kind == "tokens" else {}
        self.model = build_model(model, input_size=self.crop, num_classes=facts.num_classes, **sizes)
        self.curriculum = GridCurriculum.from_config(curriculum, final=self.crop,
                                                     stride=self.model.vit.patch_embed.patch_size[0])
        if self.curriculum is not None and not self.aug.rrc["enabled"]:
            raise ValueError("task.curriculum trains on smaller crops through RandomResizedCrop: set aug.rrc.enabled=true "
                             "(aug=seit, seitpp and deit have it)")
        if self.curriculum is not None and self.curriculum.batch_steps and scheduler \
                and scheduler.get("horizon", "epochs") != "budget":
            raise ValueError("task.curriculum.batch_sizes changes the steps per epoch, which a cosine over epochs "
                             "counts in advance: use scheduler.horizon=budget (the LR then follows training time)")
        if self.curriculum is not None and not model.get("dynamic_img_size", True):
            raise ValueError("task.curriculum needs model.dynamic_img_size=true (the position embedding is resampled to "
                             "each stage's grid)")
        if linear_probe:  # only the pooled features' LayerNorm and the linear head learn
            self.model.requires_grad_(False)
            for part in (self.model.vit.fc_norm, self.model.vit.head):
                part.requires_grad_(True)
        self.enable_ema(self.model)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)  # val loss, on labels
        self.soft_criterion = nn.CrossEntropyLoss()  # train loss, on soft targets that hold the smoothing
        num_classes = facts.num_classes
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
        self.class_names: list[str] = [str(c) for c in range(num_classes)]  # the dataset's, once attached

    @classmethod
    def upgrade_hparams(cls, hp: dict) -> dict:
        """A checkpoint from before the config-composed tasks: sizes at the top level, no ``_target_``s."""
        model = dict(hp.pop("model"))
        data = {"kind": "tokens" if model["input"] == "tokens" else "images", "num_classes": hp.pop("num_classes"),
                "input_grid": hp.pop("input_grid"), "batch_size": hp.pop("batch_size"),
                "codebook_size": model.pop("codebook_size", 0), "codebook_dim": model.pop("codebook_dim", 0),
                "codebook_sha256": hp.pop("codebook_sha256", None)}
        optim = {"_target_": "seit.tasks.optim.create_optimizer", "_partial_": True,
                 **{k: v for k, v in hp.pop("optim").items() if k not in ("warmup_epochs", "min_lr")}}
        return {**hp, "model": {"_target_": "seit.models.vit.TokenViT", **model}, "data": data, "optim": optim,
                "scheduler": None}

    # -- what the base class asks -------------------------------------------------------------
    def optimized_module(self) -> nn.Module:
        return self.model.vit  # the embedding holds buffers only; timm's ViT gives layer-decay groups

    def compiled_modules(self) -> list[nn.Module]:
        return [self.model.vit]

    def codebook_embeddings(self) -> list:
        if self.input_key != "ids":
            return []
        return [self.model.embed] + ([self.ema.module.embed] if self.ema is not None else [])

    def attach_data(self, datamodule) -> None:
        """The dataset's codebook, then what the config asks to start from: a pre-trained encoder,
        a TokenAdapt, and (Token-EDA) the dataset's synonym table."""
        super().attach_data(datamodule)
        if self.curriculum is not None and self.curriculum.batch_steps:
            if not hasattr(datamodule, "set_batch_schedule"):
                raise ValueError("task.curriculum.batch_sizes needs a data module that takes a batch schedule "
                                 "(seit.data.batch_schedule.BatchSchedule)")
            datamodule.set_batch_schedule(self.curriculum.batch_size_at)
        names = getattr(datamodule, "classes", None) if datamodule is not None else None
        if not names and datamodule is not None and hasattr(datamodule, "load_info"):
            names = datamodule.load_info().classes
        if names and len(names) == self.data.num_classes:
            self.class_names = [str(c) for c in names]
        model, aug = self.hparams.model, self.hparams.aug
        if model.get("pretrained"):
            self.load_pretrained(model["pretrained"])
        if self.input_key != "ids":
            return
        if (aug.get("tokenadapt") or {}).get("checkpoint"):
            self.load_tokenadapt(aug["tokenadapt"]["checkpoint"])
        if self.aug.eda["replace_prob"] > 0 and datamodule is not None and hasattr(datamodule, "load_info"):
            info = datamodule.load_info()  # Token-EDA: the dataset's table, else the same one from its codebook
            k = int((info.meta.get("build") or {}).get("synonyms_k") or DEFAULT_SYNONYMS_K)
            self.load_synonyms(info.load_synonyms() if info.meta.get("synonyms_file")
                               else synonyms(info.load_codebook(), k))

    # -- data on the device -------------------------------------------------------------------
    def train_batch(self, batch: dict, num_classes: int | None = None, aug: AugConfig | None = None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented input map, soft targets over ``num_classes``, default all)."""
        h, labels = self.hparams, batch["label"]
        classes, aug, g = num_classes or self.data.num_classes, aug or self.train_aug(), generator or self.step_generator()
        if self.input_key == "ids":
            return augment_tokens(batch["ids"], labels, self.model.embed, aug, classes,
                                  h.label_smoothing, self.synonyms, g, adapt=self.tokenadapt)
        return augment_pixels(batch["images"], labels, self.model.embed, aug, classes, h.label_smoothing, g)

    def train_aug(self) -> AugConfig:
        """The augmentation of the current epoch: the curriculum's crop size, when there is one."""
        if self.curriculum is None:
            return self.aug
        return replace(self.aug, crop=self.curriculum.size_at(self.current_epoch))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.curriculum is not None and self.curriculum.batch_steps:
            self.trainer.reload_dataloaders_every_n_epochs = 1  # each epoch's loader takes that epoch's batch
        if self.curriculum is not None:
            rank_zero_info(f"grid-size curriculum (training crop): {self.curriculum.describe()}; validation at "
                           + ("the final size" if self.curriculum.eval_on_final_size else "the current size"))

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.curriculum is not None:
            self.log("train/crop", float(self.curriculum.size_at(self.current_epoch)), on_step=False, on_epoch=True)

    def export(self, output_dir, name: str = CLASSIFIER_FILE) -> dict:
        """The trained classifier (its EMA when there is one) as ``classifier.safetensors``, with the
        class names in label order: what ``task=eval``, ``task=predict`` and ``seit.predict`` read."""
        net = self.ema.module if self.ema is not None else self.model
        path = Path(output_dir) / name
        save_classifier(self.exported_model(net), path, config=self.export_config(), input_size=self.data.input_grid,
                        crop=self.crop, classes=self.class_names, fingerprint=self.data.codebook_sha256)
        return {"classifier_export": str(path)}

    def exported_model(self, net: nn.Module) -> nn.Module:
        """The network whose head rows are in label order (a continual learner permutes its slots)."""
        return net

    def export_config(self) -> dict:
        model = {k: v for k, v in dict(self.hparams.model).items() if k != "pretrained"}
        return {"model": model, "codebook_size": self.data.codebook_size, "codebook_dim": self.data.codebook_dim}

    def load_tokenadapt(self, path: str) -> None:
        """Install a trained TokenAdapt, frozen; it must share the dataset's codebook."""
        self.tokenadapt = load_tokenadapt(path, self.data.codebook_sha256)

    def load_synonyms(self, synonyms: torch.Tensor | None) -> None:
        if synonyms is None and self.aug.eda["replace_prob"] > 0:
            raise DatasetError("aug.eda.replace_prob > 0 needs the dataset's synonym table; this dataset has none "
                               "(tokenize it with data.build.synonyms_k > 0)")
        self.synonyms = synonyms.long() if synonyms is not None else None

    def load_pretrained(self, path: str) -> None:
        """Start from a pre-trained model (``model.pretrained``): the encoder of an MTM export
        (``mtm.safetensors`` of task=pretrain_mtm; token models with ``embedding=learned``), or the body
        of a classifier of ours (``classifier.safetensors``, or a task=train / task=continual ``.ckpt``;
        tokens or pixels) or of a DINO backbone (``dino.safetensors``): see ``load_classifier_body``."""
        if pretrained_kind(path) == "mtm":
            if self.input_key != "ids":
                raise ValueError(f"model.pretrained={path} is an MTM encoder of token ids; it cannot start a pixel "
                                 "model (data.kind=images)")
            load_encoder_into(self.model, path, self.data.codebook_sha256)
        else:
            load_classifier_body(self.model, path, self.data.codebook_sha256)
        if self.ema is not None:
            self.ema.module.load_state_dict(self.model.state_dict())

    def train(self, mode: bool = True):
        """A linear probe keeps the frozen body in eval mode (no dropout or drop-path on features)."""
        super().train(mode)
        if self.hparams.linear_probe:
            self.model.eval()
        return self

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

    # -- steps --------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, targets = self.train_batch(batch)
        loss = self.soft_criterion(self.model(x), targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["label"].shape[0])
        return loss

    def on_validation_epoch_end(self) -> None:
        self._log_val_metrics()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = eval_view(self.model.embed(batch[self.input_key]), self.aug)
        if self.curriculum is not None and (size := self.curriculum.eval_size_at(self.current_epoch)) < x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
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


# -- model.pretrained from a classifier of ours -----------------------------------------------------
def pretrained_kind(path: str | Path) -> str:
    """``mtm`` for an MTM export, ``classifier`` for anything else (a classifier export or a Lightning
    checkpoint, checked when loaded); FileNotFoundError names a missing ``model.pretrained``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: {path} not found (an mtm.safetensors of task=pretrain_mtm, or "
                                "a classifier.safetensors / .ckpt of task=train)")
    if path.suffix != ".safetensors":
        return "classifier"
    from safetensors import safe_open

    from seit.utils.checkpoint_io import unreadable

    with unreadable(path, "model.pretrained"), safe_open(str(path), "pt") as f:
        kind = (f.metadata() or {}).get("kind")
    return kind if kind in ("mtm", "dino") else "classifier"


def architecture(state: dict[str, torch.Tensor], num_heads: int) -> dict:
    """What must agree between two ``TokenViT`` for one's body to load into the other, read from a
    state dict (the head count is not in the shapes: it comes from the model config)."""
    blocks = {k.split(".")[2] for k in state if k.startswith("vit.blocks.")}
    width = state["vit.pos_embed"].shape[-1]
    facts = {"input": "tokens" if "embed.codebook" in state else "pixels", "embed_dim": int(width),
             "depth": len(blocks), "num_heads": int(num_heads),
             "mlp_ratio": state["vit.blocks.0.mlp.fc1.weight"].shape[0] / width,
             "embedding": "learned" if "vit.patch_embed.tokens.weight" in state else "codebook",
             "init_values (LayerScale)": "vit.blocks.0.ls1.gamma" in state}
    if facts["input"] == "tokens":
        facts["codebook_size"], facts["codebook_dim"] = tuple(state["embed.codebook"].shape)
    else:
        facts["patch_size"] = tuple(state["vit.patch_embed.proj.weight"].shape[-2:])
    return facts


def read_classifier_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str | None]:
    """(the network's state dict, its model config, its codebook fingerprint) of a classifier export or
    of a task=train / task=continual ``.ckpt`` (its EMA weights when it has them), without rebuilding
    the task; an MTM checkpoint is refused (its export is what starts a classifier)."""
    from seit.models.export import read_classifier
    from seit.utils.checkpoint_io import unreadable

    path = Path(path)
    if path.suffix == ".safetensors" and pretrained_kind(path) == "dino":
        from seit.models.export import read_dino

        state, config, fingerprint = read_dino(path, "model.pretrained")
        body = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        return body, config["model"], fingerprint
    if path.suffix == ".safetensors":
        state, meta = read_classifier(path, "model.pretrained")
        return state, meta["config"]["model"], meta["codebook_sha256"]
    with unreadable(path, "model.pretrained"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "mask" in hp:
        raise ValueError(f"model.pretrained: {path} is a task=pretrain_mtm checkpoint; start from its export "
                         "<run>/mtm.safetensors instead")
    if "crops" in hp:
        raise ValueError(f"model.pretrained: {path} is a task=pretrain_dino / distill checkpoint; start from its export "
                         "<run>/dino.safetensors instead")
    if "label_smoothing" not in hp or "state_dict" not in ckpt:
        raise ValueError(f"model.pretrained: {path} is not a classifier checkpoint of ours (task=train or continual)")
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in ckpt["state_dict"]) else "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    fingerprint = (hp.get("data") or {}).get("codebook_sha256") or hp.get("codebook_sha256")
    return state, dict(hp["model"]), fingerprint


def load_classifier_body(classifier: nn.Module, path: str | Path, codebook_sha256: str | None) -> None:
    """Copy a trained classifier's body into ``classifier`` (a ``TokenViT``): every weight but the
    head (``vit.head.*``), which keeps its fresh initialisation because the classes differ. The
    position embedding is resampled (timm ``resample_abs_pos_embed``) when the crop grids differ.

    ``path``: a ``classifier.safetensors`` export or a Lightning ``.ckpt`` of task=train /
    task=continual (its EMA weights when it has them; ``read_classifier_state``), or a
    ``dino.safetensors`` backbone (a mean-pool classifier drops its class token, takes the patch
    positions, and its final LayerNorm as the pooled features' LayerNorm).
    Refused with a one-line ValueError naming ``path``: another architecture (input, width, depth,
    heads, MLP ratio, embedding, codebook or patch size), another codebook than the dataset's
    (``codebook_sha256``), an MTM checkpoint (use its ``mtm.safetensors`` export).
    """
    from timm.layers import resample_abs_pos_embed

    from seit.data.dataset_info import codebook_fingerprint

    source, config, fingerprint = read_classifier_state(path)
    target = classifier.state_dict()
    own = architecture(target, classifier.vit.blocks[0].attn.num_heads)
    theirs = architecture(source, config.get("num_heads", 0))
    bad = [f"{k}: checkpoint {theirs.get(k)} vs model {own[k]}" for k in own if theirs.get(k) != own[k]]
    if bad:
        raise ValueError(f"model.pretrained: {path} does not fit model.*: " + "; ".join(bad))
    if own["input"] == "tokens":
        fingerprint = fingerprint or codebook_fingerprint(source["embed.codebook"])
        if codebook_sha256 and fingerprint != codebook_sha256:
            raise ValueError(f"model.pretrained: {path} was trained on codebook {fingerprint[:12]}…, but this "
                             f"dataset's codebook is {codebook_sha256[:12]}…; tokenize the images with that model's "
                             "tokenizer")
    state = {k: v for k, v in source.items() if not k.startswith("vit.head.")}
    pos = "vit.pos_embed"
    prefix = int("vit.cls_token" in state)
    if prefix and "vit.cls_token" not in target:  # a DINO backbone into a mean-pool classifier: patches only
        state.pop("vit.cls_token")
        state[pos] = state[pos][:, prefix:]
        prefix = 0
        for part in ("weight", "bias"):  # its final norm becomes the pooled features' norm (timm has one of the two)
            if f"vit.norm.{part}" in state and f"vit.norm.{part}" not in target:
                state[f"vit.fc_norm.{part}"] = state.pop(f"vit.norm.{part}")
    if pos in state and pos in target and state[pos].shape != target[pos].shape:
        side = round((state[pos].shape[1] - prefix) ** 0.5)  # crops are square
        state[pos] = resample_abs_pos_embed(state[pos], new_size=list(classifier.vit.patch_embed.grid_size),
                                            old_size=[side, side], num_prefix_tokens=prefix)
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items()
             if k in target and v.shape != target[k].shape]
    missing, unexpected = classifier.load_state_dict(state, strict=False) if not wrong else ([], [])
    missing = [k for k in missing if not k.startswith(("vit.head.", "vit.fc_norm."))]  # fresh pooled-feature norm
    if wrong or missing or unexpected:
        raise ValueError(f"model.pretrained: {path} does not fit the classifier (shapes {wrong[:3]}, missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
