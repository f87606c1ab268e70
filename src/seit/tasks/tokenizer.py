"""Training the VQ tokenizer (``task=train_tokenizer``).

Loss: L1 + L2 reconstruction, the quantiser's commitment term, an optional perceptual term
(VGG16 features whose weights come from a local file: nothing is downloaded) and an optional
hinge adversarial term from a PatchGAN discriminator after ``adv_start_step``. Validation
reports PSNR and SSIM and writes a reconstruction grid (originals above, reconstructions
below) into the run dir, also logged to wandb when it is a logger.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics
from PIL import Image
from pytorch_lightning.loggers import WandbLogger

from seit.augment.crop import center_crop, random_crop, random_hflip
from seit.tasks.base import SeitTask
from seit.tokenizers.vq import VQTokenizer
from seit.tokenizers.vq_model import VQModel
from seit.utils.visuals import image_grid


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: one real/fake logit per overlapping patch."""

    def __init__(self, ch: int = 64, layers: int = 3):
        super().__init__()
        mods, cin = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2)], ch
        for i in range(1, layers):
            cout = ch * min(2 ** i, 8)
            mods += [nn.Conv2d(cin, cout, 4, 2, 1), nn.GroupNorm(min(32, cout // 4), cout), nn.LeakyReLU(0.2)]
            cin = cout
        mods.append(nn.Conv2d(cin, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


class VGGPerceptual(nn.Module):
    """Feature distance under a frozen torchvision VGG16 loaded from a local state dict."""

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, weights_path: str):
        super().__init__()
        from torchvision.models import vgg16

        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"perceptual loss weights {weights_path} not found (a torchvision vgg16 state dict)")
        vgg = vgg16()
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        missing, unexpected = vgg.load_state_dict(state, strict=False)
        if any(k.startswith("features.") for k in missing):
            raise ValueError(f"{weights_path} is not a torchvision vgg16 state dict: missing {missing[:5]}")
        self.features = vgg.features[:23].eval().requires_grad_(False)  # up to relu4_3
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa = self.features((a - self.mean) / self.std)
        fb = self.features((b - self.mean) / self.std)
        return F.mse_loss(fa, fb)


class TokenizerTask(SeitTask):
    """``vq``: the ``tokenizer.model`` config (``VQModel``'s arguments); ``image_size``: the tokenizer's."""

    data_kind = "images"

    def __init__(self, *, vq: dict, image_size: int, data: dict, optim: dict, scheduler: dict | None = None,
                 crop: int | None = None, l1_weight: float = 1.0, l2_weight: float = 1.0, perceptual_weight: float = 0.0,
                 perceptual_weights: str | None = None, adv_weight: float = 0.0, adv_start_step: int = 0,
                 hflip: float = 0.5, compact: bool = True, init_from: str | None = None, seed: int = 0):
        super().__init__(data=data, optim=optim, scheduler=scheduler, seed=seed)
        # The tokenizer steps its optimizers by hand; checkpoints holding the post-step state are what we want.
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        self.automatic_optimization = False
        start = self.load_start(init_from) if init_from else None
        if start is not None:  # fine-tuning: the saved architecture wins over tokenizer.model
            vq = {**vq, **start.config}
        self.model = VQModel(**vq)
        if start is not None:
            self.model.load_state_dict(start.state_dict())
        self.crop = crop or image_size
        if self.crop % self.model.downsample:
            raise ValueError(f"crop {self.crop} is not a multiple of the downsampling {self.model.downsample}")
        self.perceptual = VGGPerceptual(perceptual_weights) if perceptual_weight > 0 and perceptual_weights else None
        if perceptual_weight > 0 and not perceptual_weights:
            raise ValueError("task.perceptual_weight > 0 needs task.perceptual_weights=PATH (a local vgg16 state dict)")
        self.discriminator = PatchDiscriminator() if adv_weight > 0 else None
        self.psnr = torchmetrics.image.PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = torchmetrics.image.StructuralSimilarityIndexMeasure(data_range=1.0)
        self._val_grid: torch.Tensor | None = None
        # per-code use over the latest validation pass: export drops the codes it never used
        self.register_buffer("val_code_counts", torch.zeros(self.model.config["codebook_size"]), persistent=False)

    @staticmethod
    def load_start(path: str) -> VQModel:
        """The model of a saved VQ tokenizer, to fine-tune (e.g. on the images it will tokenize)."""
        from seit.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(path, what="task.init_from")
        if not isinstance(tokenizer, VQTokenizer):
            raise ValueError(f"task.init_from={path} is a {tokenizer.kind!r} tokenizer; only a 'vq' one can be fine-tuned")
        return tokenizer.model

    def batch_images(self, batch: dict, train: bool) -> torch.Tensor:
        x = batch["images"].float() / 255
        if train:
            x = random_crop(x, self.crop)
            return random_hflip(x, self.hparams.hflip) if self.hparams.hflip else x
        return center_crop(x, self.crop)

    def reconstruction_loss(self, x: torch.Tensor, recon: torch.Tensor) -> dict:
        h = self.hparams
        losses = {"l1": F.l1_loss(recon, x) * h.l1_weight, "l2": F.mse_loss(recon, x) * h.l2_weight}
        if self.perceptual is not None:
            losses["perceptual"] = self.perceptual(recon, x) * h.perceptual_weight
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opts = self.optimizers()
        opt_g, opt_d = (opts if isinstance(opts, list) else (opts, None))
        x = self.batch_images(batch, train=True)
        recon, _, stats = self.model(x)
        losses = {**self.reconstruction_loss(x, recon), "commit": stats["commit"]}
        use_adv = self.discriminator is not None and self.global_step >= self.hparams.adv_start_step
        if use_adv:
            losses["adv_g"] = -self.discriminator(recon).mean() * self.hparams.adv_weight
        loss = sum(losses.values())
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt_g.step()
        if use_adv:
            real, fake = self.discriminator(x), self.discriminator(recon.detach())
            d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            self.log("train/d_loss", d_loss, batch_size=x.shape[0])
        for sched in self.lr_schedulers() if isinstance(self.lr_schedulers(), list) else [self.lr_schedulers()]:
            if sched is not None:
                sched.step()
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=x.shape[0])
        self.log("train/perplexity", stats["perplexity"], batch_size=x.shape[0])
        self.log("train/codebook_usage", stats["usage"], batch_size=x.shape[0])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = self.batch_images(batch, train=False)
        ids = self.model.encode(x)
        recon = self.model.decode(ids)
        if batch_idx == 0:
            self.val_code_counts.zero_()
        self.val_code_counts += torch.bincount(ids.reshape(-1), minlength=self.val_code_counts.numel()).float()
        self.psnr.update(recon, x)
        self.ssim.update(recon, x)
        if batch_idx == 0:
            self._val_grid = torch.cat([x[:8], recon[:8]]).detach().cpu()

    def on_validation_epoch_end(self) -> None:
        self.log("val/psnr", self.psnr.compute(), prog_bar=True, sync_dist=True)
        self.log("val/ssim", self.ssim.compute(), sync_dist=True)
        self.log("val/codes_used", (self.val_code_counts > 0).sum().float(), sync_dist=True)
        self.psnr.reset()
        self.ssim.reset()
        if self._val_grid is not None and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            path = Path(self.trainer.default_root_dir) / "reconstructions" / f"epoch_{self.current_epoch:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image_grid(self._val_grid, cols=max(1, len(self._val_grid) // 2))).save(path)
            for logger in self.trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key="val/reconstructions", images=[str(path)], caption=["top: input, bottom: reconstruction"])

    def configure_optimizers(self):
        """The generator's optimizer and schedule (encoder, decoder; the codebook follows its EMA), and
        the discriminator's optimizer when there is one."""
        opt_g = self.create_optimizer(list(self.model.encoder.parameters()) + list(self.model.decoder.parameters()))
        scheduler = self.create_scheduler(opt_g)["scheduler"]
        if self.discriminator is None:
            return [opt_g], [scheduler]
        return [opt_g, self.create_optimizer(self.discriminator.parameters())], [scheduler]

    def export(self, output_dir: Path) -> dict:
        """Save the trained tokenizer where task=tokenize can use it, without codes unused on val."""
        path = Path(output_dir) / "tokenizer.safetensors"
        tokenizer = VQTokenizer(self.model.cpu(), self.hparams.image_size)
        counts = self.val_code_counts.cpu()
        if self.hparams.compact and counts.sum() > 0:
            tokenizer = tokenizer.compacted(counts)
        tokenizer.save(path)
        return {"tokenizer_checkpoint": str(path), "codebook_size": tokenizer.codebook_size}
