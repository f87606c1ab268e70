"""DINOv2 on tokens (``task=pretrain_dino``) and its distillation into a smaller student (``task=distill``).

Oquab et al. 2023 (../shared/reference/curation-and-efficient-vit.md §4.4-4.5), with the crops cut
from the codebook map (Token-RRC) instead of the image, so pre-training reads token shards only.
Per batch, on the device, every draw from the task's (seed, rank, step) generator:

- multi-crop: 2 global crops (``crops.global_size``, scale ``crops.global_scale``) and
  ``crops.local_number`` local ones at a smaller grid (``crops.local_size``, ``crops.local_scale``),
  so the ViT sees several grid sizes (timm ``dynamic_img_size``); tokens then take the aug group's
  Emb-Noise / ColorAdapt per crop, pixels its horizontal flip;
- iBOT block masks on a share of the student's global crops (``masks.*``);
- the teacher (an EMA of the student, momentum cosine 0.994 -> 1) scores the unmasked global crops;
  its targets are centred by Sinkhorn-Knopp (or softmax centering) at a temperature warmed up from
  0.04 to 0.07; the student's temperature is 0.1;
- loss = DINO (class token, all crop pairs) + iBOT (masked patches, a separate head) + 0.1 KoLeo
  (the first global crop's class tokens), reduced in float32;
- weight decay follows a cosine 0.04 -> 0.2 and the prototypes stay frozen for the first epoch.

``task=distill`` (DINOv2 §5; the code was never released) reuses all of it with a frozen teacher
read from any checkpoint of ours: its DINO heads when it has them (a DINO export), else fresh
random projection heads, frozen too. No masking, iBOT on every patch of both global crops, no
teacher update; a separate EMA of the student (``ema_decay``) is exported and never feeds back.

Validation: leave-one-out weighted k-NN (k=20, T=0.07) on the val split's class tokens of the
network that gets exported (``val/knn_acc1``). The run writes ``dino.safetensors``
(``seit.models.export``): ``model.pretrained`` fine-tunes it, ``task=eval`` / ``task=embed`` read it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from pytorch_lightning.utilities import rank_zero_warn

from seit.augment.crop import center_crop
from seit.augment.pipeline import AugConfig, color_choice
from seit.augment.rrc import token_rrc
from seit.models.dino import (DinoHead, DinoModel, SoftmaxCenter, block_masks, dino_loss, ibot_loss, koleo_loss,
                              mask_ratios, sinkhorn_knopp)
from seit.models.export import DINO_FILE, save_dino
from seit.tasks.base import SeitTask
from seit.tasks.dino_build import build_dino, global_crop_size
from seit.utils.budget import TrainingBudget
from seit.utils.knn import knn_predict

CENTERINGS = ("sinkhorn_knopp", "softmax")
INPUT_KEYS = {"tokens": "ids", "images": "images"}


def cosine_ramp(start: float, end: float, progress: float) -> float:
    """start at progress 0 -> end at progress >= 1, along half a cosine (DINO's schedules)."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


class DinoTask(SeitTask):
    """DINOv2 pre-training; see the module doc. Config: ``conf/task/pretrain_dino.yaml``."""

    def __init__(self, *, model: dict, aug: dict, data: dict, optim: dict, crops: dict, heads: dict, loss: dict,
                 teacher: dict, masks: dict, scheduler: dict | None = None, weight_decay_end: float | None = None,
                 freeze_last_layer_epochs: float = 1.0, knn: dict | None = None, seed: int = 0,
                 ema_decay: float = 0.0, compile: bool = False):
        super().__init__(data=data, optim=optim, scheduler=scheduler, seed=seed, ema_decay=ema_decay, compile=compile)
        if teacher.get("checkpoint") and type(self) is DinoTask:
            raise ValueError("task.teacher.checkpoint: pre-training's teacher is the student's EMA; a frozen teacher is "
                             "task=distill (experiment=distill_tokens)")
        self.input_key = INPUT_KEYS[self.data.kind]
        self.aug = AugConfig.from_dict(aug)
        self.check_aug()
        grid = self.data.input_grid
        self.global_size = global_crop_size(crops, aug, grid)
        self.local_size = int(crops.get("local_size") or 0)
        if not 0 < self.global_size <= grid:
            raise ValueError(f"task.crops.global_size={self.global_size} must be in (0, {grid}] (the input grid)")
        if crops["local_number"] and not 0 < self.local_size < self.global_size:
            raise ValueError(f"task.crops.local_size={self.local_size} must be in (0, global_size={self.global_size}) "
                             "when task.crops.local_number > 0")
        if loss["centering"] not in CENTERINGS:
            raise ValueError(f"task.loss.centering={loss['centering']!r} must be one of {CENTERINGS}")
        if self.data.batch_size < 2 and loss["koleo_weight"]:
            raise ValueError("KoLeo needs at least 2 samples per batch: raise data.batch_size or set task.loss.koleo_weight=0")
        sizes = {"codebook_size": self.data.codebook_size, "codebook_dim": self.data.codebook_dim} \
            if self.data.kind == "tokens" else {}
        self.student = build_dino(model, heads, self.data.kind, self.global_size, sizes)
        self.build_teacher()
        prototypes = self.student.dino_head.prototypes.shape[0], self.student.ibot_head.prototypes.shape[0]
        self.dino_center = SoftmaxCenter(prototypes[0], loss["center_momentum"])
        self.ibot_center = SoftmaxCenter(prototypes[1], loss["center_momentum"])
        self.enable_ema(self.student)
        self._val_features: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    # -- the teacher ----------------------------------------------------------------------------
    def build_teacher(self) -> None:
        """DINOv2: the teacher starts as a copy of the student and follows it by EMA, never by gradient."""
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # no drop-path and no dropout in the teacher, ever
        return self

    def teacher_tokens(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.teacher.tokens(crops)

    def teacher_heads(self) -> tuple[nn.Module, nn.Module]:
        return self.teacher.dino_head, self.teacher.ibot_head

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (lerp)."""
        t = [p for p in self.teacher.parameters()]
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(t, s, 1.0 - momentum)

    def exported(self) -> DinoModel:
        """What the run hands on: the EMA teacher's backbone and heads."""
        return self.teacher

    # -- schedules ------------------------------------------------------------------------------
    def progress(self) -> float:
        """Share of training done: steps over the nominal total, or the time budget spent
        (``scheduler.horizon=budget``), as the LR schedule counts it."""
        if self._trainer is None:
            return 0.0
        if (self.hparams.scheduler or {}).get("horizon") == "budget":
            budget = next((c for c in self.trainer.callbacks if isinstance(c, TrainingBudget)), None)
            if budget is not None and budget.max_time_s:
                return budget.spent()
        total = self.trainer.estimated_stepping_batches
        return self.global_step / total if math.isfinite(total) and total > 0 else 0.0

    def steps_per_epoch(self) -> float:
        total, epochs = self.trainer.estimated_stepping_batches, self.trainer.max_epochs
        return total / epochs if math.isfinite(total) and epochs and epochs > 0 else float(self.trainer.num_training_batches)

    def teacher_temperature(self) -> float:
        """Linear warmup from ``teacher.warmup_temp`` to ``teacher.temp`` over ``teacher.warmup_temp_epochs``."""
        t = self.hparams.teacher
        if self._trainer is None or not t["warmup_temp_epochs"]:
            return float(t["temp"])
        done = self.global_step / max(1.0, t["warmup_temp_epochs"] * self.steps_per_epoch())
        return float(t["warmup_temp"] + min(1.0, done) * (t["temp"] - t["warmup_temp"]))

    def teacher_momentum(self) -> float:
        t = self.hparams.teacher
        return cosine_ramp(t["momentum"], t["momentum_end"], self.progress())

    # -- a batch --------------------------------------------------------------------------------
    def check_aug(self) -> None:
        a = self.aug
        if a.mixes or a.eda["replace_prob"] or a.eda["swap_prob"] or a.tokenadapt.get("checkpoint") or a.pixel_only():
            raise ValueError("DINO's views are Token-RRC crops (+ aug.noise / aug.color_adapt on tokens, aug.hflip on "
                             "pixels): turn off CutMix/Mixup, Token-EDA, TokenAdapt and the loader's pixel augmentations")
        if self.input_key == "ids" and a.hflip:
            raise ValueError("aug.hflip works on pixels: a flipped token grid is not a flipped image")

    def source(self, batch: dict) -> torch.Tensor:
        """The batch as the map crops are cut from: the codebook map (tokens) or the normalised image."""
        return self.student.backbone.embed(batch[self.input_key])

    def views(self, x: torch.Tensor, size: int, scale, copies: int, g: torch.Generator) -> torch.Tensor:
        """``copies`` random resized crops of every sample, crop-major: [copies * B, C, size, size]."""
        out = token_rrc(x.repeat(copies, 1, 1, 1), size, scale, self.aug.rrc["ratio"], g)
        if self.input_key == "ids":
            return color_choice(out, self.aug, g)
        if self.aug.hflip > 0:
            flip = torch.rand(out.shape[0], generator=g, device=out.device) < self.aug.hflip
            out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return out

    def patch_grid(self, size: int) -> tuple[int, int]:
        h, w = self.student.backbone.vit.patch_embed.dynamic_feat_size((size, size))
        return int(h), int(w)

    def student_masks(self, n: int, g: torch.Generator) -> torch.Tensor | None:
        """iBOT masks [n, h, w] for the global crops; None where nothing is masked."""
        m = self.hparams.masks
        ratios = mask_ratios(n, m["probability"], m["ratio"][0], m["ratio"][1], g, self.device)
        h, w = self.patch_grid(self.global_size)
        return block_masks(ratios, h, w, g, min_patches=m["min_patches"])

    def targets(self, scores: torch.Tensor, center: SoftmaxCenter, temperature: float) -> torch.Tensor:
        loss = self.hparams.loss
        if loss["centering"] == "sinkhorn_knopp":
            return sinkhorn_knopp(scores, temperature, loss["sinkhorn_iterations"])
        return center(scores, temperature)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        g = self.step_generator()
        c, loss_cfg = self.hparams.crops, self.hparams.loss
        x = self.source(batch)
        b = x.shape[0]
        globals_ = self.views(x, self.global_size, c["global_scale"], 2, g)
        locals_ = self.views(x, self.local_size, c["local_scale"], c["local_number"], g) if c["local_number"] else None
        masks = self.student_masks(2 * b, g)
        selected = self.ibot_selection(masks)  # [2B, h*w] the patches iBOT scores
        temp = self.teacher_temperature()
        with torch.no_grad():
            t_cls, t_patch = self.teacher_tokens(globals_)
            dino_t, ibot_t = self.teacher_heads()
            t_dino = self.targets(dino_t(t_cls), self.dino_center, temp).chunk(2)
            t_ibot = self.targets(ibot_t(t_patch[selected]), self.ibot_center, temp)
        s_cls, s_patch = self.student.tokens(globals_, masks if self.masks_student() else None)
        s_all = s_cls if locals_ is None else torch.cat([s_cls, self.student.tokens(locals_)[0]])
        s_dino = self.student.dino_head(s_all).chunk(2 + (c["local_number"] if locals_ is not None else 0))
        counts = selected.sum(1, keepdim=True).clamp_min(1).float()
        weight = (1.0 / counts).expand_as(selected)[selected]
        losses = {"dino": dino_loss(list(s_dino), list(t_dino), loss_cfg["student_temp"]),
                  "ibot": ibot_loss(self.student.ibot_head(s_patch[selected]), t_ibot, weight, 2 * b,
                                    loss_cfg["student_temp"]) if selected.any() else s_patch.sum() * 0.0,
                  "koleo": koleo_loss(s_cls[:b]) if loss_cfg["koleo_weight"] else s_cls.sum() * 0.0}
        total = (loss_cfg["dino_weight"] * losses["dino"] + loss_cfg["ibot_weight"] * losses["ibot"]
                 + loss_cfg["koleo_weight"] * losses["koleo"])
        self.log("train/loss", total, prog_bar=True, batch_size=b)
        for name, value in losses.items():
            self.log(f"train/{name}_loss", value, batch_size=b)
        self.log("train/teacher_temp", temp, batch_size=b)
        self.log("train/masked_share", selected.float().mean(), batch_size=b)
        return total

    def masks_student(self) -> bool:
        return True

    def ibot_selection(self, masks: torch.Tensor) -> torch.Tensor:
        """bool [2B, h*w]: the patches the iBOT loss scores (pre-training: the masked ones)."""
        return masks.flatten(1)

    # -- the optimizer step ---------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        """Weight decay on its cosine (``optim.weight_decay`` -> ``weight_decay_end``) for the groups that
        decay, and no update of the prototypes during the first ``freeze_last_layer_epochs`` (DINO)."""
        end = self.hparams.weight_decay_end
        if end is not None:
            wd = cosine_ramp(float(self.hparams.optim.get("weight_decay", 0.0)), float(end), self.progress())
            for group in optimizer.param_groups:
                if group.get("weight_decay", 0.0) > 0:
                    group["weight_decay"] = wd
            self.log("train/weight_decay", wd)
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            for head in (self.student.dino_head, self.student.ibot_head):
                head.prototypes.grad = None

    def optimizer_step(self, *args, **kwargs) -> None:
        momentum = self.teacher_momentum()  # of the step being taken
        super().optimizer_step(*args, **kwargs)
        self.after_student_step(momentum)

    def after_student_step(self, momentum: float) -> None:
        self.update_teacher(momentum)
        self.log("train/teacher_momentum", momentum)

    # -- validation: leave-one-out k-NN on the exported network's class tokens ------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = self.source(batch)
        view = center_crop(x, self.global_size) if self.global_size < x.shape[-1] else x
        cls, _ = self.exported().tokens(view)
        self._val_features.append(cls.float())
        self._val_labels.append(batch["label"].long())

    def on_validation_epoch_end(self) -> None:
        if not self._val_features:
            return
        feats = torch.cat(self._val_features)
        labels = torch.cat(self._val_labels)
        self._val_features, self._val_labels = [], []
        if self.trainer.world_size > 1:
            feats, labels = self.gather_rows(feats), self.gather_rows(labels)
        labelled = labels >= 0  # unlabelled samples (label -1) are left out of the monitor
        feats, labels = feats[labelled], labels[labelled]
        if len(labels) < 2 or self.data.num_classes < 2:
            rank_zero_warn("val/knn_acc1 needs labelled val samples; run with task.metric=null to keep the last checkpoint")
            return
        knn = self.hparams.knn or {"k": 20, "temperature": 0.07}
        f, y = feats.cpu().numpy(), labels.cpu().numpy()
        scores = knn_predict(f, y, f, int(knn["k"]), float(knn["temperature"]), self.data.num_classes, exclude_self=True)
        acc = float((scores.argmax(1) == y).mean())
        self.log("val/knn_acc1", acc, prog_bar=True, sync_dist=False)
        self.log("val/feature_std", float(np.std(f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12), 0).mean()))

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``x`` [n, ...], in rank order; ranks may hold different n (uneven val splits)."""
        n = torch.tensor([x.shape[0]], device=x.device)
        counts = self.all_gather(n).flatten()
        padded = torch.zeros((int(counts.max()),) + x.shape[1:], dtype=x.dtype, device=x.device)
        padded[:x.shape[0]] = x
        rows = self.all_gather(padded)
        return torch.cat([rows[r, :int(c)] for r, c in enumerate(counts)])

    # -- what the base class asks ---------------------------------------------------------------
    def optimized_module(self) -> nn.Module:
        return self.student

    def compiled_modules(self) -> list[nn.Module]:
        return [self.student.backbone.vit.blocks]

    def codebook_embeddings(self) -> list:
        if self.input_key != "ids":
            return []
        nets = [self.student, self.teacher] + ([self.ema.module] if self.ema is not None else [])
        return [n.backbone.embed for n in nets if isinstance(n, DinoModel)]

    def export(self, output_dir: str | Path) -> dict:
        path = Path(output_dir) / DINO_FILE
        save_dino(self.exported(), path, config=self.export_config(), fingerprint=self.data.codebook_sha256)
        return {"dino_export": str(path)}

    def export_config(self) -> dict:
        model = {k: v for k, v in dict(self.hparams.model).items() if k != "pretrained"}
        return {"model": {**model, "class_token": True}, "heads": dict(self.hparams.heads), "input_size": self.global_size,
                "data_kind": self.data.kind, "codebook_size": self.data.codebook_size,
                "codebook_dim": self.data.codebook_dim}


class DistillTask(DinoTask):
    """DINOv2 distillation: a frozen teacher (``teacher.checkpoint``: a DINO, MTM or classifier
    checkpoint of ours on the same codebook) into the student ``model.*``. Config:
    ``conf/task/distill.yaml``."""

    def __init__(self, *, teacher: dict, ema_decay: float = 0.999, **kwargs):
        if not teacher.get("checkpoint"):
            raise ValueError("task=distill needs task.teacher.checkpoint (a dino.safetensors, mtm.safetensors, "
                             "classifier.safetensors or a .ckpt of ours)")
        if not 0 < ema_decay < 1:
            raise ValueError(f"task.ema_decay={ema_decay}: distillation exports the student's EMA, so it must be in (0, 1)")
        super().__init__(teacher=teacher, ema_decay=ema_decay, **kwargs)

    def build_teacher(self) -> None:
        from seit.tasks.checkpoint import load_model

        path = self.hparams.teacher["checkpoint"]
        loaded = load_model(path, "task.teacher.checkpoint")
        if loaded.input != ("tokens" if self.input_key == "ids" else "pixels"):
            raise ValueError(f"task.teacher.checkpoint: {path} reads {loaded.input}, the student reads "
                             f"{'tokens' if self.input_key == 'ids' else 'pixels'}")
        fingerprint = self.data.codebook_sha256
        if self.input_key == "ids" and loaded.fingerprint and fingerprint and loaded.fingerprint != fingerprint:
            raise ValueError(f"task.teacher.checkpoint: {path} was trained on codebook {loaded.fingerprint[:12]}…, "
                             f"the dataset (and so the student) uses {fingerprint[:12]}…; distil on tokens of the "
                             "teacher's tokenizer")
        self.teacher_kind = loaded.kind
        self.teacher = loaded.net.requires_grad_(False).eval()
        self._teacher_tokens = loaded.tokens
        self.teacher_reads_ids = loaded.reads_ids
        k_dino, k_ibot = self.student.dino_head.prototypes.shape[0], self.student.ibot_head.prototypes.shape[0]
        if loaded.heads is not None:  # DINOv2: the teacher's own heads, frozen; the student projects onto them
            dino_head, ibot_head = loaded.heads
            if (dino_head.prototypes.shape[0], ibot_head.prototypes.shape[0]) != (k_dino, k_ibot):
                raise ValueError(f"task.heads: the teacher {path} has {dino_head.prototypes.shape[0]} DINO and "
                                 f"{ibot_head.prototypes.shape[0]} iBOT prototypes, the student's heads {k_dino} and "
                                 f"{k_ibot}: set task.heads.prototypes / ibot_prototypes to the teacher's")
        else:  # features only: fresh random projection heads, frozen like the rest of the teacher
            h = {k: v for k, v in self.hparams.heads.items() if k != "ibot_prototypes"}
            dino_head = DinoHead(loaded.dim, **h)
            ibot_head = DinoHead(loaded.dim, **{**h, "prototypes": k_ibot})
        self.teacher_dino_head = dino_head.requires_grad_(False).eval()
        self.teacher_ibot_head = ibot_head.requires_grad_(False).eval()
        self.check_teacher_grid(path)

    def check_teacher_grid(self, path: str) -> None:
        """iBOT pairs teacher and student patches one to one: their grids at the global crop must agree."""
        x = torch.zeros(1, self.student.backbone.embed.out_chans, self.global_size, self.global_size)
        with torch.no_grad():
            _, t_patch = self.teacher_tokens(x)
            _, s_patch = self.student.tokens(x)
        if t_patch.shape[1] != s_patch.shape[1]:
            raise ValueError(f"task.teacher.checkpoint: {path} gives {t_patch.shape[1]} patches on a "
                             f"{self.global_size}x{self.global_size} crop, the student {s_patch.shape[1]}; iBOT pairs "
                             "them one to one: use a student with the teacher's stem (model.patch_size / embedding)")

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_dino_head.eval()
        self.teacher_ibot_head.eval()
        return self

    def teacher_tokens(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.student.backbone.embed.nearest(crops) if self.teacher_reads_ids else crops
        cls, patches = self._teacher_tokens(x)
        return cls, patches.flatten(2).transpose(1, 2) if patches.dim() == 4 else patches

    def teacher_heads(self) -> tuple[nn.Module, nn.Module]:
        return self.teacher_dino_head, self.teacher_ibot_head

    def masks_student(self) -> bool:
        return False  # DINOv2 distillation: no masking

    def ibot_selection(self, masks: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(masks.flatten(1))  # iBOT on every patch of both global crops

    def after_student_step(self, momentum: float) -> None:
        """The teacher stays as loaded; the base class has already stepped the student's EMA."""

    def teacher_momentum(self) -> float:
        return 1.0

    def exported(self) -> DinoModel:
        return self.ema.module  # the EMA of the student is the released model (DINOv2 issue #96)

    def codebook_embeddings(self) -> list:
        if self.input_key != "ids":
            return []
        return [self.student.backbone.embed, self.ema.module.backbone.embed]
