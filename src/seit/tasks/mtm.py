"""Masked token modeling pre-training (``task=pretrain_mtm``, SeiT++) and the hand-over to fine-tuning.

Each batch goes through the token augmentation pipeline (``aug``; SeiT++: Token-RRC with scale
(0.2, 1), optionally TokenAdapt on half the batch), is re-quantised to ids by cosine on the
device, and is masked with one ratio per batch drawn from a truncated normal. Labels are never
read. Validation masks the center crop at a fixed ratio with a fixed seed per batch, so
``val/mtm_acc`` (masked-token accuracy, the checkpoint metric) is comparable across epochs.

The run exports ``mtm.safetensors``: the encoder and decoder with their config and the codebook
fingerprint. ``model.pretrained=<that file>`` starts a classifier from the encoder
(``load_encoder_into``), refusing another codebook or another architecture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchmetrics
from safetensors import safe_open
from safetensors.torch import save_file
from timm.optim import param_groups_weight_decay

from seit.augment.crop import center_crop
from seit.augment.pipeline import AugConfig, augment_tokens, step_seed
from seit.models.input_embed import CodebookEmbedding
from seit.models.mtm import MaskedTokenModel, masked_token_loss, random_masks, soft_targets, truncated_normal
from seit.models.tokenadapt import sincos_pos
from seit.tasks.schedule import global_batch, scaled_lr, warmup_cosine_schedule

EXPORT_FILE = "mtm.safetensors"
# what must agree between a pre-trained encoder and the classifier that loads it
ARCH_KEYS = {"embed_dim": "embed_dim", "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio",
             "codebook_size": "codebook_size", "token_dim": "codebook_dim"}


class MTMTask(pl.LightningModule):
    def __init__(self, model: dict, mask: dict, optim: dict, aug: dict, input_grid: int, batch_size: int,
                 codebook_size: int, codebook_dim: int, codebook_sha256: str | None = None, smoothing: float = 0.0,
                 seed: int = 0, soft_tau: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.aug = AugConfig.from_dict(aug)
        self.crop = int(self.aug.crop) if self.aug.crop else input_grid
        if self.crop > input_grid or self.crop % 2:
            raise ValueError(f"aug.crop={self.crop} must be even and at most the {input_grid} input grid")
        self.aug.crop = self.crop
        if self.aug.mixes:
            raise ValueError("MTM pre-training reads no labels: turn CutMix/Mixup off (aug.mix.*_alpha=0)")
        if not 0 <= mask["drop_ratio"] <= mask["min"] <= mask["max"] <= 1:
            raise ValueError(f"need 0 <= mask.drop_ratio <= mask.min <= mask.max <= 1, got {mask}")
        self.codebook = CodebookEmbedding(codebook_size, codebook_dim)  # frozen: what augmentations work on
        self.model = MaskedTokenModel(codebook_size=codebook_size, grid=self.crop, token_dim=codebook_dim, **model)
        self.tokenadapt = None
        self.register_buffer("target_ids", None, persistent=False)  # soft targets (soft_tau > 0)
        self.register_buffer("target_weights", None, persistent=False)
        self.val_loss, self.val_acc = torchmetrics.MeanMetric(), torchmetrics.MeanMetric()
        self._generator: torch.Generator | None = None

    def load_codebook(self, codebook: torch.Tensor) -> None:
        self.codebook.load_codebook(codebook)
        if self.hparams.soft_tau > 0:
            idx, weight = soft_targets(codebook, self.hparams.soft_tau)
            self.target_ids, self.target_weights = idx.to(self.device), weight.to(self.device)

    def load_tokenadapt(self, path: str) -> None:
        from seit.tasks.tokenadapt import load_tokenadapt

        self.tokenadapt = load_tokenadapt(path, self.hparams.codebook_sha256)

    def generator(self, seed: int) -> torch.Generator:
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)
        return self._generator

    def on_train_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    def targets(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.target_ids, self.target_weights) if self.target_ids is not None else None

    def sample_ratio(self, generator: torch.Generator) -> float:
        m = self.hparams.mask
        return truncated_normal(m["mean"], m["std"], m["min"], m["max"], generator, self.device)

    def masked_step(self, ids: torch.Tensor, ratio: float, generator: torch.Generator):
        n = (ids.shape[1] // 2) * (ids.shape[2] // 2)
        masked, dropped = random_masks(ids.shape[0], n, ratio, self.hparams.mask["drop_ratio"], generator, self.device)
        logits = self.model(ids, masked, dropped)
        loss, acc = masked_token_loss(logits, ids, masked, self.hparams.smoothing, self.targets())
        return loss, acc, logits, masked

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        g = self.generator(step_seed(self.hparams.seed, self.global_rank, self.global_step))
        ids = batch["ids"]
        x, _ = augment_tokens(ids, torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device), self.codebook,
                              self.aug, 1, 0.0, None, g, adapt=self.tokenadapt)
        ratio = self.sample_ratio(g)
        loss, acc, _, _ = self.masked_step(self.codebook.nearest(x), ratio, g)
        bs = ids.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/mtm_acc", acc, prog_bar=True, batch_size=bs)
        self.log("train/mask_ratio", ratio, batch_size=bs)
        return loss

    def eval_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return center_crop(ids[:, None], self.crop)[:, 0] if self.crop < ids.shape[-1] else ids

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        g = self.generator(step_seed(self.hparams.seed, self.global_rank, -1 - batch_idx))
        ids = self.eval_ids(batch["ids"]).long()
        loss, acc, _, _ = self.masked_step(ids, self.hparams.mask["val_ratio"], g)
        self.val_loss.update(loss, weight=ids.shape[0])
        self.val_acc.update(acc, weight=ids.shape[0])

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), sync_dist=True)
        self.log("val/mtm_acc", self.val_acc.compute(), prog_bar=True, sync_dist=True)
        self.val_loss.reset()
        self.val_acc.reset()

    @torch.no_grad()
    def predict_masked(self, ids: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the preview: (ids, token mask [B,H,W], ids with every masked token predicted)."""
        was_training = self.training
        self.eval()
        ids = self.eval_ids(ids.to(self.device)).long()
        _, _, logits, masked = self.masked_step(ids, self.hparams.mask["val_ratio"], self.generator(seed))
        self.train(was_training)
        side = ids.shape[-1] // 2
        token_mask = masked.view(-1, side, side).repeat_interleave(2, 1).repeat_interleave(2, 2)
        return ids, token_mask, torch.where(token_mask, logits.argmax(-1), ids)

    def configure_optimizers(self):
        o = self.hparams.optim
        lr = scaled_lr(o, global_batch(self, self.hparams.batch_size))
        groups = param_groups_weight_decay(self.model, o["weight_decay"], {"cls_token", "mask_token", "decoder_pos"})
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(o["betas"]), eps=o["eps"])
        return {"optimizer": optimizer, "lr_scheduler": warmup_cosine_schedule(optimizer, self.trainer, o, lr)}

    def export(self, output_dir: str | Path) -> dict:
        path = Path(output_dir) / EXPORT_FILE
        save_mtm(self.model, path, self.hparams.codebook_sha256 or "")
        return {"mtm_checkpoint": str(path)}


def save_mtm(model: MaskedTokenModel, path: str | Path, fingerprint: str) -> None:
    tmp = f"{path}.tmp"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp, metadata={"kind": "mtm", "config": json.dumps(model.config), "codebook_sha256": fingerprint})
    os.replace(tmp, path)


def read_mtm(path: str | Path) -> tuple[dict, dict, str]:
    """(state, config, codebook fingerprint) of an exported MTM model."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.pretrained: {path} not found (task=pretrain_mtm writes <run>/{EXPORT_FILE})")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a .ckpt, a truncated file, anything not safetensors
        raise ValueError(f"model.pretrained: {path} is not an {EXPORT_FILE} file ({e})") from e
    if meta.get("kind") != "mtm" or "config" not in meta:
        raise ValueError(f"model.pretrained: {path} is not an MTM export (task=pretrain_mtm writes <run>/{EXPORT_FILE})")
    return state, json.loads(meta["config"]), meta.get("codebook_sha256", "")


def load_encoder_into(classifier, path: str | Path, codebook_sha256: str | None) -> None:
    """Copy a pre-trained MTM encoder (id embedding, stem, blocks) into a ``TokenViT`` with
    ``embedding=learned``; positions become the fixed sin-cos grid the encoder was trained with,
    at the classifier's grid. The head starts near zero (MAE/SeiT++: std 2e-5)."""
    state, config, fingerprint = read_mtm(path)
    if not getattr(classifier, "requantize", False):
        raise ValueError("model.pretrained needs model.embedding=learned (the MTM encoder reads ids, not codebook vectors)")
    if codebook_sha256 and fingerprint and fingerprint != codebook_sha256:
        raise ValueError(f"model.pretrained: {path} was pre-trained on codebook {fingerprint[:12]}…, but this dataset's "
                         f"codebook is {codebook_sha256[:12]}…; pre-train on tokens from the same tokenizer")
    vit = classifier.vit
    own = {"embed_dim": vit.embed_dim, "depth": len(vit.blocks), "num_heads": vit.blocks[0].attn.num_heads,
           "mlp_ratio": vit.blocks[0].mlp.fc1.out_features / vit.embed_dim,
           "codebook_size": vit.patch_embed.tokens.num_embeddings, "codebook_dim": vit.patch_embed.tokens.embedding_dim}
    bad = [f"{mine}: checkpoint {config[theirs]} vs model {own[mine]}" for theirs, mine in ARCH_KEYS.items()
           if float(config[theirs]) != float(own[mine])]
    if bad:
        raise ValueError(f"model.pretrained: {path} does not fit model.*: " + "; ".join(bad))
    encoder = {k: v for k, v in state.items() if k.startswith(("patch_embed.", "blocks."))}
    missing, unexpected = vit.load_state_dict(encoder, strict=False)
    left = [k for k in missing if not k.startswith(("head.", "fc_norm.", "norm.", "pos_embed"))]
    if left or unexpected:
        raise ValueError(f"model.pretrained: {path} does not fit the classifier (missing {left[:5]}, unexpected {unexpected[:5]})")
    side = vit.patch_embed.grid_size
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_pos(side[0], side[1], vit.embed_dim))
        torch.nn.init.trunc_normal_(vit.head.weight, std=2e-5)
        torch.nn.init.zeros_(vit.head.bias)
