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

from pathlib import Path

import torch
import torchmetrics

from seit.augment.crop import center_crop
from seit.augment.pipeline import AugConfig, augment_tokens
from seit.models.export import MTM_FILE, load_tokenadapt, save_mtm
from seit.models.input_embed import CodebookEmbedding
from seit.models.mtm import MaskedTokenModel, masked_token_loss, random_masks, soft_targets, truncated_normal
from seit.tasks.base import SeitTask

# the encoder's settings in conf/model (what a classifier from the same model config shares)
ENCODER_KEYS = {"embed_dim": "embed_dim", "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio",
                "token_dropout": "dropout"}


class MTMTask(SeitTask):
    """``model``: the ``conf/model`` config whose encoder settings (embed_dim, depth, num_heads,
    mlp_ratio, token_dropout) the MTM encoder takes, so a classifier from the same config loads it;
    ``decoder``: the MAGE decoder's sizes."""

    data_kind = "tokens"

    def __init__(self, *, model: dict, decoder: dict, mask: dict, aug: dict, data: dict, optim: dict,
                 scheduler: dict | None = None, smoothing: float = 0.0, soft_tau: float = 0.0, seed: int = 0,
                 ema_decay: float = 0.0, compile: bool = False):
        super().__init__(data=data, optim=optim, scheduler=scheduler, seed=seed, ema_decay=ema_decay, compile=compile)
        if model.get("input", "tokens") != "tokens":
            raise ValueError("task=pretrain_mtm pre-trains on tokens: use model.input=tokens")
        self.aug = AugConfig.from_dict(aug)
        grid = self.data.input_grid
        self.crop = int(self.aug.crop) if self.aug.crop else grid
        if self.crop > grid or self.crop % 2:
            raise ValueError(f"aug.crop={self.crop} must be even and at most the {grid} input grid")
        self.aug.crop = self.crop
        if self.aug.mixes:
            raise ValueError("MTM pre-training reads no labels: turn CutMix/Mixup off (aug.mix.*_alpha=0)")
        if not 0 <= mask["drop_ratio"] <= mask["min"] <= mask["max"] <= 1:
            raise ValueError(f"need 0 <= mask.drop_ratio <= mask.min <= mask.max <= 1, got {mask}")
        size, dim = self.data.codebook_size, self.data.codebook_dim
        self.codebook = CodebookEmbedding(size, dim)  # frozen: what augmentations work on
        encoder = {mine: model[key] for key, mine in ENCODER_KEYS.items() if key in model}
        self.model = MaskedTokenModel(codebook_size=size, grid=self.crop, codebook_dim=dim, **encoder, **decoder)
        self.enable_ema(self.model)
        self.tokenadapt = None
        self.register_buffer("target_ids", None, persistent=False)  # soft targets (soft_tau > 0)
        self.register_buffer("target_weights", None, persistent=False)
        self.val_loss, self.val_acc = torchmetrics.MeanMetric(), torchmetrics.MeanMetric()

    @classmethod
    def upgrade_hparams(cls, hp: dict) -> dict:
        """A checkpoint from before the config-composed tasks: encoder and decoder in one ``model``."""
        arch = dict(hp.pop("model"))
        decoder = {k: arch.pop(k) for k in list(arch) if k.startswith("decoder_")}
        model = {"token_dropout" if k == "dropout" else k: v for k, v in arch.items()}
        data = {"kind": "tokens", "num_classes": 0, "input_grid": hp.pop("input_grid"), "batch_size": hp.pop("batch_size"),
                "codebook_size": hp.pop("codebook_size"), "codebook_dim": hp.pop("codebook_dim"),
                "codebook_sha256": hp.pop("codebook_sha256", None)}
        optim = {"_target_": "seit.tasks.optim.create_optimizer", "_partial_": True,
                 **{k: v for k, v in hp.pop("optim").items() if k not in ("warmup_epochs", "min_lr")}}
        return {**hp, "model": model, "decoder": decoder, "data": data, "optim": optim, "scheduler": None}

    def codebook_embeddings(self) -> list:
        return [self.codebook]

    def compiled_modules(self) -> list:
        return [self.model.blocks, self.model.decoder_blocks]

    def attach_data(self, datamodule) -> None:
        super().attach_data(datamodule)
        checkpoint = (self.hparams.aug.get("tokenadapt") or {}).get("checkpoint")
        if checkpoint:
            self.tokenadapt = load_tokenadapt(checkpoint, self.data.codebook_sha256)

    def load_codebook(self, codebook: torch.Tensor) -> None:
        super().load_codebook(codebook)
        if self.hparams.soft_tau > 0:
            idx, weight = soft_targets(codebook, self.hparams.soft_tau)
            self.target_ids, self.target_weights = idx.to(self.device), weight.to(self.device)

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
        g = self.step_generator()
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
        g = self.step_generator(-1 - batch_idx)  # the same masks every validation
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
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        _, _, logits, masked = self.masked_step(ids, self.hparams.mask["val_ratio"], generator)
        self.train(was_training)
        side = ids.shape[-1] // 2
        token_mask = masked.view(-1, side, side).repeat_interleave(2, 1).repeat_interleave(2, 2)
        return ids, token_mask, torch.where(token_mask, logits.argmax(-1), ids)

    def export(self, output_dir: str | Path) -> dict:
        path = Path(output_dir) / MTM_FILE
        save_mtm(self.model, path, self.data.codebook_sha256 or "")
        return {"mtm_checkpoint": str(path)}
