"""``eval=segmentation``: semantic segmentation from a backbone's token-grid features (CamVid).

SeiT++ evaluates its token-trained ViTs on ADE-20k segmentation; here a CamVid-style set
(``seit.data.segmentation``: 11 classes, void = 11 ignored) is segmented by a head on
``LoadedModel.grid_features``. Each configured run ``<head>_<mode>`` (heads ``linear``/``decoder``,
modes ``frozen``/``finetune``; ``seit.tasks.segmentation``) trains on the train split with one
Lightning ``Trainer`` and is scored on the val split at full mask resolution.

Inputs, at ``width`` x ``height`` (squash-resized, bicubic): a token model reads the images
tokenized once per call with the token dataset's own tokenizer (``ctx.tokenizer()``), the
mirrored images too (for horizontal-flip augmentation); a pixel model reads the uint8 images.
Both sides must be multiples of the model's input stride (tokens: tokenizer downsampling x the
stem's stride; pixels: the patch size). Training targets are the masks reduced to the head's
output grid by per-cell majority vote (``mask_to_grid``: a mostly-void cell is void, ignored by
the loss); predictions are upsampled (bilinear logits) to each mask's full size for scoring.

Metrics per run: ``miou/<run>``, ``pixel_acc/<run>``; tables: mIoU / pixel accuracy by head x
mode, per-class IoU. Per-run files under ``<output_dir>/segmentation/<run>/``: the Trainer's
``metrics.csv``, ``confusion.csv`` (val pixels, rows true), ``scores.json``, ``predictions.png``
(image, labels, prediction of a few val images).

Runs on rank 0 only (one small single-device training per run); other ranks return None.
The evaluated model is restored (weights, trainability, device, eval mode) after each run.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.loggers import CSVLogger
from timm.layers import PatchEmbed
from torch.utils.data import DataLoader, Dataset

from seit.data.dataset_info import DatasetError
from seit.data.segmentation import SegmentationSplit, load_split, mask_to_grid
from seit.eval.context import EvalContext
from seit.eval.result import EvalResult, Table
from seit.tasks.segmentation import HEAD_SCALES, HEADS, MODES, SegmentationTask, iou_scores
from seit.utils.io import atomic_open
from seit.utils.visuals import image_grid

log = logging.getLogger(__name__)
# SegNet's CamVid colours (sky, building, pole, road, pavement, tree, sign, fence, car, pedestrian, bicyclist)
CAMVID_COLOURS = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))


class _TrainSet(Dataset):
    def __init__(self, x: torch.Tensor, target: torch.Tensor, x_flip: torch.Tensor | None):
        self.x, self.target, self.x_flip = x, target, x_flip

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        item = {"x": self.x[i], "target": self.target[i]}
        if self.x_flip is not None:
            item["x_flip"] = self.x_flip[i]
        return item


class _ValSet(Dataset):
    def __init__(self, x: torch.Tensor, masks: list[torch.Tensor], images: torch.Tensor | None = None):
        self.x, self.masks, self.images = x, masks, images  # images: uint8, for the drawing

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.masks[i]


def _collate_val(items: list) -> dict:
    return {"x": torch.stack([x for x, _ in items]), "masks": [m for _, m in items]}


def input_stride(net: torch.nn.Module, tokenizer=None) -> int:
    """Image pixels per feature-grid cell: the body's patch stride (its first timm ``PatchEmbed``:
    a ViT's patchify or stem, the MTM encoder's id patches) times the tokenizer's downsampling."""
    patch = next((m for m in net.modules() if isinstance(m, PatchEmbed)), None)
    body = int(patch.patch_size[0]) if patch is not None else 1
    return body * (int(tokenizer.downsample) if tokenizer is not None else 1)


class Segmentation:
    """Train and score segmentation heads on a frozen or fine-tuned backbone (see the module doc).

    ``root``: the dataset (``<split>/images``, ``<split>/masks``); ``runs``: ``<head>_<mode>`` names;
    ``width``/``height``: the input size (pixels); ``epochs``, ``batch_size``, ``lr`` (the head's,
    absolute; null = the run's optim rule), ``backbone_lr_scale`` (fine-tuning), ``warmup_epochs``
    (null = the run's scheduler's), ``decoder_width``, ``hflip`` (random horizontal flips);
    ``num_classes`` (void = num_classes), ``classes`` (names; null = ids); ``max_images``: use the
    first N pairs of each split (smoke tests), null = all.
    """

    name = "segmentation"

    def __init__(self, root: str, runs: list[str] | tuple[str, ...] = ("linear_frozen", "linear_finetune",
                                                            "decoder_frozen", "decoder_finetune"),
                 width: int = 160, height: int = 120, epochs: int = 10, batch_size: int = 16,
                 eval_batch_size: int = 32, lr: float | None = 1e-2, backbone_lr_scale: float = 0.1,
                 warmup_epochs: float | None = 1.0, decoder_width: int = 128, hflip: bool = True,
                 num_classes: int = 11, classes: list[str] | None = None, train_split: str = "train",
                 val_split: str = "val", max_images: int | None = None, num_workers: int = 0):
        self.root = str(root)
        self.runs = [str(r) for r in runs]
        for run in self.runs:
            head, _, mode = run.partition("_")
            if head not in HEADS or mode not in MODES:
                raise ValueError(f"eval.segmentation.runs: {run!r} is not <head>_<mode> with head in {HEADS} and "
                                 f"mode in {MODES}")
        if len(set(self.runs)) != len(self.runs) or not self.runs:
            raise ValueError(f"eval.segmentation.runs={self.runs} must name at least one run, each once")
        for key, value in (("width", width), ("height", height), ("epochs", epochs), ("batch_size", batch_size),
                           ("eval_batch_size", eval_batch_size), ("num_classes", num_classes)):
            if int(value) < 1:
                raise ValueError(f"eval.segmentation.{key}={value} must be >= 1")
        self.size = (int(height), int(width))
        self.epochs, self.batch_size, self.eval_batch_size = int(epochs), int(batch_size), int(eval_batch_size)
        self.lr = lr
        self.backbone_lr_scale, self.warmup_epochs = float(backbone_lr_scale), warmup_epochs
        self.decoder_width, self.hflip = int(decoder_width), bool(hflip)
        self.num_classes = int(num_classes)
        self.classes = [str(c) for c in classes] if classes else [str(i) for i in range(self.num_classes)]
        if len(self.classes) != self.num_classes:
            raise ValueError(f"eval.segmentation.classes names {len(self.classes)} classes, num_classes={num_classes}")
        self.train_split, self.val_split = train_split, val_split
        self.max_images, self.num_workers = max_images, int(num_workers)

    # -- inputs ------------------------------------------------------------------------------------
    def model_inputs(self, ctx: EvalContext, images: torch.Tensor,
                     mirrored: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(model inputs, their mirrored version or None) of uint8 images ``[N, 3, H, W]``: a token
        model's ids, tokenized by the dataset's tokenizer (``mirrored``: the mirrored images too), a
        pixel model's images (mirrored on the fly in training: None)."""
        if ctx.model.input != "tokens":
            return images, None
        tokenizer = ctx.tokenizer()
        out = []
        for batch in (images, images.flip(-1)) if mirrored else (images,):
            ids = []
            for start in range(0, len(batch), 64):
                try:
                    with torch.inference_mode():
                        ids.append(tokenizer.encode(batch[start:start + 64].float() / 255).cpu())
                except ValueError as exc:
                    raise DatasetError(f"eval.segmentation: the dataset's tokenizer ({tokenizer.kind}) cannot encode "
                                       f"{self.size[1]}x{self.size[0]} images ({exc}); set eval.segmentation.width/"
                                       f"height to a size it takes (a fixed-size tokenizer: both "
                                       f"{tokenizer.image_size})") from None
            out.append(torch.cat(ids))
        return out[0], (out[1] if len(out) > 1 else None)

    def check_size(self, ctx: EvalContext) -> int:
        """The input stride; refuses a width/height that is not a multiple of it."""
        tokenizer = ctx.tokenizer() if ctx.model.input == "tokens" else None
        stride = input_stride(ctx.model.net, tokenizer)
        if self.size[0] % stride or self.size[1] % stride:
            what = (f"tokenizer downsampling {tokenizer.downsample} x stem stride {stride // tokenizer.downsample}"
                    if tokenizer is not None else f"patch size {stride}")
            raise ValueError(f"eval.segmentation.width/height={self.size[1]}x{self.size[0]} must be multiples of "
                             f"{stride}, the model's input stride ({what})")
        return stride

    @torch.no_grad()
    def feature_grid(self, ctx: EvalContext, x: torch.Tensor) -> tuple[int, int]:
        """The (h, w) of the backbone's grid features for inputs like ``x``."""
        return tuple(ctx.model.grid_features(x[:1].to(ctx.device)).shape[-2:])

    # -- one run ----------------------------------------------------------------------------------
    def train_and_score(self, ctx: EvalContext, run: str, train: dict, val: _ValSet, run_dir: Path) -> dict:
        """Train the head of ``run`` (``<head>_<mode>``) on ``train`` (``x``, ``x_flip``, ``target<scale>``),
        score it on ``val``; writes and returns its record (mIoU, pixel accuracy, per-class IoU, ...)."""
        head, _, mode = run.partition("_")
        cfg = ctx.cfg
        optim = OmegaConf.to_container(cfg.optim, resolve=True)
        optim["layer_decay"] = None  # the groups are built by the task (head / backbone)
        if self.lr is not None:
            optim["lr"] = float(self.lr)
        scheduler = OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None
        if scheduler is not None and self.warmup_epochs is not None:
            scheduler.update(warmup_epochs=float(self.warmup_epochs), warmup_fraction=None)
        pl.seed_everything(int(cfg.get("seed", 0)), verbose=False)
        model = ctx.model
        data = {"kind": "tokens" if model.input == "tokens" else "images", "num_classes": self.num_classes,
                "input_grid": int(train["x"].shape[-1]), "batch_size": self.batch_size}
        task = SegmentationTask(head=head, mode=mode, dim=model.dim, num_classes=self.num_classes, data=data,
                                optim=optim, scheduler=scheduler, seed=int(cfg.get("seed", 0)),
                                backbone_lr_scale=self.backbone_lr_scale, decoder_width=self.decoder_width,
                                hflip=self.hflip)
        task.set_backbone(model.net, model.grid_features)
        target = train[f"target{task.scale}"]
        loader = DataLoader(_TrainSet(train["x"], target, train["x_flip"]), batch_size=self.batch_size, shuffle=True,
                            num_workers=self.num_workers, drop_last=len(target) > self.batch_size,
                            generator=torch.Generator().manual_seed(int(cfg.get("seed", 0))))
        val_loader = DataLoader(val, batch_size=self.eval_batch_size, collate_fn=_collate_val,
                                num_workers=self.num_workers)
        cuda = ctx.device.type == "cuda"
        trainer = pl.Trainer(
            accelerator="gpu" if cuda else "cpu", devices=[ctx.device.index or 0] if cuda else 1,
            precision="bf16-mixed" if cuda else "32-true", max_epochs=self.epochs, default_root_dir=str(run_dir),
            logger=CSVLogger(str(run_dir), name="", version=""), enable_checkpointing=False,
            enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=max(1, min(10, len(loader))))
        start = time.time()
        with warnings.catch_warnings():  # by design: no validation during fit, a frozen backbone in eval mode
            warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
            trainer.fit(task, train_dataloaders=loader)
        trainer.validate(task, dataloaders=val_loader, verbose=False)
        seconds = time.time() - start
        self.draw(task, val, run_dir / "predictions.png")
        matrix = task.last_confusion
        scores = iou_scores(matrix)
        with atomic_open(run_dir / "confusion.csv") as f:
            f.write(("true\\pred," + ",".join(self.classes) + "\n").encode())
            for name, row in zip(self.classes, matrix):
                f.write((name + "," + ",".join(map(str, row)) + "\n").encode())
        record = {"head": head, "mode": mode, "miou": scores["miou"], "pixel_acc": scores["pixel_acc"],
                  "val_pixels": scores["pixels"], "per_class_iou": dict(zip(self.classes, _json_floats(scores["iou"]))),
                  "epochs": self.epochs, "train_images": len(target), "seconds": round(seconds, 1),
                  "output_grid": [int(target.shape[-1]), int(target.shape[-2])], "dir": str(run_dir)}
        with atomic_open(run_dir / "scores.json") as f:
            f.write(json.dumps(record, indent=2).encode())
        return record

    @torch.no_grad()
    def draw(self, task: SegmentationTask, val: _ValSet, path: Path, count: int = 4) -> None:
        """``predictions.png``: ``count`` val images spread over the split (rows): image, labels,
        prediction, at the input size (labels nearest-resized; void black)."""
        if val.images is None or not len(val):
            return
        task.eval()
        pick = torch.from_numpy(np.unique(np.linspace(0, len(val) - 1, count).round().astype(np.int64)))
        logits = task(val.x[pick].to(task.device)).float()
        size = tuple(val.images.shape[-2:])
        pred = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1).cpu()
        labels = torch.stack([F.interpolate(val.masks[i][None, None].float(), size=size, mode="nearest")[0, 0].long()
                              for i in pick.tolist()])
        palette = torch.from_numpy(self.palette()).float() / 255  # [C + 1, 3], void last
        rows = []
        for image, label, guess in zip(val.images[pick].float() / 255, labels, pred):
            rows += [image, palette[label].permute(2, 0, 1), palette[guess].permute(2, 0, 1)]
        Image.fromarray(image_grid(torch.stack(rows), cols=3)).save(path)

    def palette(self) -> np.ndarray:
        """uint8 [num_classes + 1, 3]: CamVid's colours for its 11 classes, else evenly spread hues; void black."""
        if self.num_classes == len(CAMVID_COLOURS):
            colours = np.array(CAMVID_COLOURS)
        else:
            import colorsys

            colours = np.array([colorsys.hsv_to_rgb(i / self.num_classes, 0.8, 0.9) for i in range(self.num_classes)])
            colours = colours * 255
        return np.concatenate([colours, [[0, 0, 0]]]).astype(np.uint8)

    # -- the evaluator ---------------------------------------------------------------------------
    def __call__(self, ctx: EvalContext) -> EvalResult | None:
        if ctx.rank != 0:
            return None
        stride = self.check_size(ctx)
        splits: dict[str, SegmentationSplit] = {
            s: load_split(self.root, s, self.size, void=self.num_classes, limit=self.max_images)
            for s in (self.train_split, self.val_split)}
        train_split, val_split = splits[self.train_split], splits[self.val_split]
        x, x_flip = self.model_inputs(ctx, train_split.images, mirrored=self.hflip)
        val_x = self.model_inputs(ctx, val_split.images, mirrored=False)[0]
        grid = self.feature_grid(ctx, x)
        expected = (self.size[0] // stride, self.size[1] // stride)
        if grid != expected:
            raise ValueError(f"eval.segmentation: {self.size[1]}x{self.size[0]} inputs give a {grid[1]}x{grid[0]} "
                             f"feature grid, not {expected[1]}x{expected[0]} (stride {stride})")
        train = {"x": x, "x_flip": x_flip}
        for scale in sorted({HEAD_SCALES[r.partition("_")[0]] for r in self.runs}):
            cells = (grid[0] * scale, grid[1] * scale)
            train[f"target{scale}"] = torch.cat([mask_to_grid(m[None], cells, self.num_classes, self.num_classes)
                                                 for m in train_split.masks])
        val = _ValSet(val_x, val_split.masks, val_split.images)
        out = ctx.output_dir / self.name
        log.info("segmentation: %d train / %d val images at %dx%d -> %dx%d feature grid; runs %s", len(train_split),
                 len(val_split), self.size[1], self.size[0], grid[1], grid[0], ", ".join(self.runs))
        records = {}
        for run in self.runs:
            with _restored(ctx):
                records[run] = self.train_and_score(ctx, run, train, val, out / run)
            log.info("segmentation %s: mIoU %.4f, pixel acc %.4f (%.0f s)", run, records[run]["miou"],
                     records[run]["pixel_acc"], records[run]["seconds"])
        return self.result(records, grid)

    def result(self, records: dict, grid: tuple[int, int]) -> EvalResult:
        metrics = {}
        for run, r in records.items():
            metrics[f"miou/{run}"] = r["miou"]
            metrics[f"pixel_acc/{run}"] = r["pixel_acc"]

        def cell(head, mode, key):
            r = records.get(f"{head}_{mode}")
            return r[key] if r else "-"

        heads = [h for h in HEADS if any(r.startswith(h + "_") for r in records)]
        summary = Table(f"segmentation: val mIoU and pixel accuracy ({self.size[1]}x{self.size[0]} input, "
                        f"{grid[1]}x{grid[0]} feature grid, {self.epochs} epochs)",
                        ["head", *[f"mIoU {m}" for m in MODES], *[f"pixel acc {m}" for m in MODES]],
                        [[h, *[cell(h, m, "miou") for m in MODES], *[cell(h, m, "pixel_acc") for m in MODES]]
                         for h in heads])
        per_class = Table("segmentation: per-class IoU on val", ["class", *records],
                          [[c, *[_iou_cell(r["per_class_iou"][c]) for r in records.values()]] for c in self.classes])
        details = {"root": self.root, "size": [self.size[1], self.size[0]], "feature_grid": [grid[1], grid[0]],
                   "runs": records}  # sizes and grids as width, height
        return EvalResult(metrics, [summary, per_class], details)


def _iou_cell(v):
    return "n/a" if v is None else float(v)


def _json_floats(values: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in values]


class _restored:
    """Put the evaluated model back as it was after a run: weights (a fine-tuned backbone changed
    them), trainability, device (Lightning moves the module to the CPU at teardown) and eval mode."""

    def __init__(self, ctx: EvalContext):
        self.ctx = ctx

    def __enter__(self):
        net = self.ctx.model.net
        self.state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        self.grad = {n: p.requires_grad for n, p in net.named_parameters()}
        return self

    def __exit__(self, *exc):
        net = self.ctx.model.net
        net.load_state_dict(self.state)
        for n, p in net.named_parameters():
            p.requires_grad_(self.grad[n])
        self.ctx.model.to(self.ctx.device).eval()
        return False
