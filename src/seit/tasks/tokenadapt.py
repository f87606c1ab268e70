"""Training TokenAdapt (``task=train_tokenadapt``): the part SeiT++ never published.

For images x, the dataset's tokenizer T and a random geometric augmentation A (flip, affine,
RandomResizedCrop; one affine matrix per sample), the converters learn ``g(A(f(T(x))))`` ->
``T(A(x))`` with cross-entropy over the ids. Pixels are needed only here, once, offline; the
classifier later uses f and g frozen on tokens alone.

Validation draws a fixed augmentation per batch and reports the share of ids that agree with
``T(A(x))``, for TokenAdapt and for the naive alternative (warping the id grid itself, nearest
neighbour): ``val/agree_tokenadapt`` against ``val/agree_naive``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchmetrics

from seit.augment.geo import GeoConfig, random_theta, warp, warp_ids
from seit.models.export import TOKENADAPT_FILE, save_tokenadapt
from seit.models.tokenadapt import TokenAdapt
from seit.tasks.base import SeitTask
from seit.tokenizers import load_tokenizer


class TokenAdaptTask(SeitTask):
    data_kind = "images"

    def __init__(self, *, tokenizer: str, out_grid: int, geo: dict, data: dict, optim: dict,
                 scheduler: dict | None = None, width: int = 384, heads: int = 6, seed: int = 0):
        super().__init__(data=data, optim=optim, scheduler=scheduler, seed=seed)
        self.tokenizer = load_tokenizer(tokenizer, what="task.tokenizer")  # frozen, and kept out of the checkpoint
        if self.tokenizer.image_size != self.data.input_grid:
            raise ValueError(f"data.image_size={self.data.input_grid} must be the tokenizer's image size "
                             f"{self.tokenizer.image_size} ({tokenizer})")
        self.geo = GeoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in geo.items()})
        self.adapt = TokenAdapt(self.tokenizer.codebook, width, heads)
        self.patch = self.tokenizer.downsample
        self.agree = torch.nn.ModuleDict({k: torchmetrics.MeanMetric() for k in ("tokenadapt", "naive")})

    def optimized_module(self) -> torch.nn.Module:
        return self.adapt

    def setup(self, stage: str | None = None) -> None:
        try:
            self.tokenizer.to(self.device)
        except NotImplementedError:
            pass  # encodes on the CPU; fine for the CPU runs this task is sized for

    def pair(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids of x, theta, ids of the warped image): one training example per image."""
        x = batch["images"].float() / 255
        with torch.no_grad():
            ids = self.tokenizer.encode(x).to(x.device)
            grid = ids.shape[-1]
            theta = random_theta(x.shape[0], self.geo, 2 * grid, generator, x.device)
            target = self.tokenizer.encode(warp(x, theta, self.hparams.out_grid * self.patch)).to(x.device)
        return ids, theta, target

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ids, theta, target = self.pair(batch, self.step_generator())
        logits = self.adapt.logits(ids, theta, self.hparams.out_grid)
        loss = F.cross_entropy(logits, target)
        self.log("train/loss", loss, prog_bar=True, batch_size=ids.shape[0])
        self.log("train/agree", (logits.argmax(1) == target).float().mean(), batch_size=ids.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ids, theta, target = self.pair(batch, self.step_generator(-1 - batch_idx))  # the same draws every epoch
        out = self.hparams.out_grid
        self.agree["tokenadapt"].update((self.adapt.adapt(ids, theta, out) == target).float().mean((1, 2)))
        self.agree["naive"].update((warp_ids(ids, theta, out) == target).float().mean((1, 2)))

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.agree.items():
            self.log(f"val/agree_{name}", metric.compute(), prog_bar=True, sync_dist=True)
            metric.reset()

    def export(self, output_dir: Path) -> dict:
        """Save f and g with the codebook they were trained on, for the classifier's TokenAdapt path."""
        path = Path(output_dir) / TOKENADAPT_FILE
        save_tokenadapt(self.adapt, path, self.tokenizer.fingerprint)
        return {"tokenadapt_checkpoint": str(path)}
