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

import json
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from safetensors import safe_open
from safetensors.torch import save_file

from seit.augment.geo import GeoConfig, random_theta, warp, warp_ids
from seit.augment.pipeline import step_seed
from seit.models.tokenadapt import TokenAdapt
from seit.tasks.schedule import short_warmup_cosine
from seit.tokenizers import load_tokenizer
from seit.utils.checkpoint_io import unreadable

EXPORT_FILE = "tokenadapt.safetensors"


class TokenAdaptTask(pl.LightningModule):
    def __init__(self, tokenizer: str, out_grid: int, geo: dict, optim: dict, width: int = 384, heads: int = 6,
                 seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer, what="task.tokenizer")  # frozen, and kept out of the checkpoint
        self.geo = GeoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in geo.items()})
        self.adapt = TokenAdapt(self.tokenizer.codebook, width, heads)
        self.patch = self.tokenizer.downsample
        self.agree = torch.nn.ModuleDict({k: torchmetrics.MeanMetric() for k in ("tokenadapt", "naive")})

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

    def _generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        seed = step_seed(self.hparams.seed, self.global_rank, self.global_step)
        ids, theta, target = self.pair(batch, self._generator(seed))
        logits = self.adapt.logits(ids, theta, self.hparams.out_grid)
        loss = F.cross_entropy(logits, target)
        self.log("train/loss", loss, prog_bar=True, batch_size=ids.shape[0])
        self.log("train/agree", (logits.argmax(1) == target).float().mean(), batch_size=ids.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ids, theta, target = self.pair(batch, self._generator(10_007 * batch_idx + 1))  # the same draws every epoch
        out = self.hparams.out_grid
        self.agree["tokenadapt"].update((self.adapt.adapt(ids, theta, out) == target).float().mean((1, 2)))
        self.agree["naive"].update((warp_ids(ids, theta, out) == target).float().mean((1, 2)))

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.agree.items():
            self.log(f"val/agree_{name}", metric.compute(), prog_bar=True, sync_dist=True)
            metric.reset()

    def configure_optimizers(self):
        o = self.hparams.optim
        opt = torch.optim.AdamW(self.adapt.parameters(), lr=o["lr"], betas=tuple(o["betas"]),
                                weight_decay=o["weight_decay"])
        sched = short_warmup_cosine(opt, int(self.trainer.estimated_stepping_batches), o)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, output_dir: Path) -> dict:
        """Save f and g with the codebook they were trained on, for the classifier's TokenAdapt path."""
        path = Path(output_dir) / EXPORT_FILE
        save_tokenadapt(self.adapt, path, self.tokenizer.fingerprint)
        return {"tokenadapt_checkpoint": str(path)}


def save_tokenadapt(adapt: TokenAdapt, path: str | Path, fingerprint: str) -> None:
    tmp = f"{path}.tmp"
    state = {k: v.detach().cpu().contiguous() for k, v in adapt.state_dict().items()}
    save_file(state, tmp, metadata={"config": json.dumps(adapt.config), "codebook_sha256": fingerprint})
    os.replace(tmp, path)


def load_tokenadapt(path: str | Path, expected_fingerprint: str | None = None) -> TokenAdapt:
    """A frozen TokenAdapt; refuses one trained on another codebook."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"TokenAdapt checkpoint {path} not found (train one with task=train_tokenadapt)")
    with unreadable(path, "TokenAdapt checkpoint"), safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "config" not in meta or "codebook" not in state:
        raise ValueError(f"{path} is not a TokenAdapt checkpoint (no config metadata or codebook)")
    if expected_fingerprint and meta.get("codebook_sha256") != expected_fingerprint:
        raise ValueError(f"{path} was trained on codebook {meta.get('codebook_sha256', '?')[:12]}…, "
                         f"but the dataset's is {expected_fingerprint[:12]}…")
    config = json.loads(meta["config"])
    adapt = TokenAdapt(state["codebook"], config["width"], config["heads"], config["mlp_ratio"])
    adapt.load_state_dict(state)
    return adapt.eval().requires_grad_(False)
