"""``eval=robustness``: top-1 under ImageNet-C's common corruptions (Hendrycks & Dietterich, ICLR
2019): 15 corruptions x severities 1-5 (or a chosen subset) applied to the split's image files,
then fed to the model as it is deployed: tokenized by the token dataset's own tokenizer (a token
model) or as pixels (a pixel model, data.kind=images). The corruptions are those of the PyPI package
``imagecorruptions`` (``seit.eval.corruptions``).

Each image is decoded as for training and tokenize (``load_image``: RGB, bicubic squash-resize to
the model's side S: the tokenizer's ``image_size``, or data.image_size for a pixel model), corrupted
as uint8 ``[S, S, 3]``, and classified. Severity 0 is the clean image, untouched: its score is the
clean score exactly. Every (corruption, severity, image) is seeded on its own
(``corruptions.seed_of``), so a run gives the same numbers on any number of ranks or workers.

``corrupt_size``: imagecorruptions refuses images under 32 px, and its parameters (blur radii,
frost and snow textures) are in pixels, calibrated on 224 px ImageNet. ``null`` corrupts at S
(S >= 32; at 64 px the blurs are relatively stronger than ImageNet-C's); an int C resizes the
decoded S-px image to C (bicubic), corrupts it there and resizes it back to S, which is how a
model below 32 px is scored, and how ImageNet-C's strength relative to the image is approximated
(C = 224). The round trip alone moves pixels too, so it is scored as ``resampled_acc1`` (no
corruption); severity 0 skips it and stays the clean image.

Reported (top-1): ``clean_acc1``; ``mean_acc1``, the mean over the (corruption, severity) grid
asked for (a severity 0 in it counts as clean); ``relative_robustness`` = mean / clean;
``acc1_<corruption>`` (mean over severities) and ``acc1_sev<k>`` (mean over corruptions); the
corruption x severity table goes to eval.md, the per-image hits to ``robustness/hits_<split>.npz``,
the CPU time per image of each corruption to the details (``corrupt_ms``).

``max_images``: score the first images of each class in turn (image 0 of every class, then image 1,
...), a class-balanced deterministic subset; null scores them all. ``workers``: corruption runs on the
CPU in that many processes per rank (``auto``: the cores); the model and the tokenizer on the device.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from seit.data.image_source import ImageRecord, load_image
from seit.eval.context import EvalContext
from seit.eval.corruptions import MIN_SIZE, CorruptionError, corrupt_image, resolve
from seit.eval.pixels import ImageInputs, loader_workers
from seit.eval.result import EvalResult, Table
from seit.utils.io import atomic_open
from seit.utils.validate import ConfigError

log = logging.getLogger(__name__)
CLEAN, RESAMPLED = "clean", "resampled"


def class_balanced(records: list[ImageRecord], max_images: int | None) -> list[int]:
    """Positions of ``max_images`` records (all when None), taken class by class in turn: the first
    image of each class, then the second, ...; returned in their original order."""
    if max_images is None or max_images >= len(records):
        return list(range(len(records)))
    seen: dict[int, int] = defaultdict(int)
    order = []
    for i, r in enumerate(records):
        order.append((seen[r.label], r.label, i))
        seen[r.label] += 1
    return sorted(i for _, _, i in sorted(order)[:max_images])


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3], bicubic (Pillow), as ``load_image`` resizes."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


class CorruptedImages(Dataset):
    """Item ``k`` = image ``k // P`` under condition ``k % P`` (P = len(conditions)): ``(k, uint8
    [3, S, S], CPU seconds of the corruption)``. A condition is (corruption, severity), or
    (``clean``, 0), or (``resampled``, 0): the round trip through ``corrupt_size`` alone."""

    def __init__(self, records: list[ImageRecord], indices: list[int], conditions: list[tuple[str, int]], size: int,
                 corrupt_size: int | None, seed: int):
        self.records, self.indices, self.conditions = records, indices, conditions
        self.size, self.corrupt_size, self.seed = size, corrupt_size, seed
        self._last: tuple[int, np.ndarray] | None = None  # consecutive items share an image: decode it once

    def __len__(self) -> int:
        return len(self.records) * len(self.conditions)

    def __getitem__(self, k: int):
        i, c = divmod(k, len(self.conditions))
        if self._last is None or self._last[0] != i:
            self._last = (i, load_image(self.records[i], self.size).transpose(1, 2, 0))
        image = self._last[1]
        name, severity = self.conditions[c]
        start = time.process_time()
        if name == CLEAN or severity == 0:
            out = image
        elif name == RESAMPLED:
            out = resize(resize(image, self.corrupt_size), self.size)
        else:
            big = image if self.corrupt_size is None else resize(image, self.corrupt_size)
            out = resize(corrupt_image(big, name, severity, self.seed, self.indices[i], self.records[i].where),
                         self.size)
        spent = time.process_time() - start
        return k, torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))), spent


def _one_thread(_):
    torch.set_num_threads(1)


class Robustness:
    """``corruptions``: ``all`` (the 15), a group (noise, blur, weather, digital, validation) or a
    list; ``severities``: a list of 0-5 (0 = clean); ``split``: default task.split; ``max_images``:
    null or an int (class-balanced subset); ``corrupt_size``: null or an int >= 32 (see the module
    doc); ``seed``: of the corruptions' randomness; ``workers``: ``auto`` or an int; ``tokenize_device``:
    ``auto`` or ``cpu`` (``seit.eval.pixels.ImageInputs``)."""

    name = "robustness"
    needs_head = True  # scores class predictions: refused up front for a model without a classifier head

    def __init__(self, corruptions="all", severities=(1, 2, 3, 4, 5), split: str | None = None,
                 max_images: int | None = None, corrupt_size: int | None = None, seed: int = 0, workers="auto",
                 tokenize_device: str = "auto"):
        try:
            self.corruptions = resolve(corruptions)
        except CorruptionError as exc:
            raise ConfigError(str(exc)) from None
        severities = [severities] if isinstance(severities, int) else list(severities or [])
        if not severities or any(not isinstance(s, int) or not 0 <= s <= 5 for s in severities) \
                or len(set(severities)) != len(severities):
            raise ConfigError(f"eval.robustness.severities={severities} must be distinct integers in 0..5 (0 = clean)")
        if max_images is not None and int(max_images) < 1:
            raise ConfigError(f"eval.robustness.max_images={max_images} must be null or >= 1")
        if corrupt_size is not None and int(corrupt_size) < MIN_SIZE:
            raise ConfigError(f"eval.robustness.corrupt_size={corrupt_size} must be null or >= {MIN_SIZE} "
                              "(imagecorruptions refuses smaller images)")
        if str(tokenize_device) not in ("auto", "cpu"):
            raise ConfigError(f"eval.robustness.tokenize_device={tokenize_device!r} must be auto or cpu")
        self.severities = sorted(severities)
        self.split, self.seed, self.workers = split, int(seed), workers
        self.max_images = None if max_images is None else int(max_images)
        self.corrupt_size = None if corrupt_size is None else int(corrupt_size)
        self.tokenize_device = str(tokenize_device)

    def conditions(self) -> list[tuple[str, int]]:
        """Clean first, the resampling round trip (with ``corrupt_size``), then the grid, corruption-major."""
        return ([(CLEAN, 0)] + ([(RESAMPLED, 0)] if self.corrupt_size else [])
                + [(c, s) for c in self.corruptions for s in self.severities])

    def __call__(self, ctx: EvalContext) -> EvalResult | None:
        split = self.split or str(ctx.cfg.task.split)
        ctx.check_classifier(self.name)
        inputs = ImageInputs(ctx, self.tokenize_device)
        if self.corrupt_size is None and inputs.size < MIN_SIZE:
            raise ConfigError(f"eval=robustness: this model reads {inputs.size}x{inputs.size} images; imagecorruptions "
                              f"needs >= {MIN_SIZE} px: set eval.robustness.corrupt_size={MIN_SIZE} (or more) to "
                              "corrupt at that size and resize back")
        records, skipped = self._records(ctx, split)
        chosen = class_balanced(records, self.max_images)
        mine = chosen[ctx.rank::ctx.world]
        conditions = self.conditions()
        hits, seconds = self._score(ctx, inputs, [records[i] for i in mine], mine, conditions, split)
        indices, hits, seconds = ctx.gather(np.asarray(mine, np.int64)), ctx.gather(hits), ctx.gather(seconds[None])
        if ctx.rank != 0:
            return None
        if len(indices) == 0:
            raise CorruptionError(f"eval=robustness: split {split!r} of {ctx.data_name()} has no image to score")
        out = ctx.output_dir / self.name
        out.mkdir(parents=True, exist_ok=True)
        order = np.argsort(indices, kind="stable")
        with atomic_open(out / f"hits_{split}.npz") as f:
            np.savez(f, index=indices[order], hits=hits[order], corruption=np.array([c for c, _ in conditions]),
                     severity=np.array([s for _, s in conditions]))
        return self._result(hits, seconds.sum(0), conditions, split, inputs.size, len(records), skipped,
                            out / f"hits_{split}.npz")

    def _records(self, ctx: EvalContext, split: str) -> tuple[list[ImageRecord], int]:
        """The split's labelled image files, less those tokenize skipped as unreadable (a token dataset
        lists them: they are not in its clean score either), and how many those are."""
        records = ctx.source_records(split)
        ctx.require_labels(np.array([r.label for r in records], np.int64), split, self.name)
        info = ctx.info()
        gone = set((info.meta.get("skipped") or {}).get("samples") or []) if info is not None else set()
        kept = [r for r in records if r.where not in gone]
        if len(kept) < len(records):
            log.info("eval=robustness: %d images of split %s were skipped as unreadable by tokenize; left out here too",
                     len(records) - len(kept), split)
        return kept, len(records) - len(kept)

    @torch.no_grad()
    def _score(self, ctx: EvalContext, inputs: ImageInputs, records: list[ImageRecord], indices: list[int],
               conditions: list[tuple[str, int]], split: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 hits [images, conditions] (top-1 right) of this rank's images, and CPU seconds per condition."""
        n, p = len(records), len(conditions)
        hits, seconds = np.zeros((n, p), np.uint8), np.zeros(p, np.float64)
        labels = torch.tensor([r.label for r in records], dtype=torch.int64)
        dataset = CorruptedImages(records, indices, conditions, inputs.size, self.corrupt_size, self.seed)
        loader = DataLoader(dataset, batch_size=ctx.batch_size, num_workers=loader_workers(self.workers, ctx.world),
                            worker_init_fn=_one_thread)
        bar = tqdm(total=len(dataset), desc=f"robustness {split} (rank {ctx.rank})", unit="image", disable=None,
                   leave=False)
        for ks, images, spent in loader:
            i, c = ks // p, ks % p
            x = inputs(images)
            with ctx.autocast():
                pred = ctx.model.logits(x).float().argmax(1).cpu()
            hits[i.numpy(), c.numpy()] = (pred == labels[i]).numpy()
            np.add.at(seconds, c.numpy(), spent.numpy())
            bar.update(len(ks))
        bar.close()
        return hits, seconds

    def _result(self, hits: np.ndarray, seconds: np.ndarray, conditions: list[tuple[str, int]], split: str,
                size: int, total: int, skipped: int, hits_file) -> EvalResult:
        n = len(hits)
        acc = dict(zip(conditions, hits.mean(0).tolist()))
        clean = acc[CLEAN, 0]
        grid = {(c, s): acc[c, s] for c in self.corruptions for s in self.severities}
        mean = float(np.mean(list(grid.values())))
        by_corruption = {c: float(np.mean([grid[c, s] for s in self.severities])) for c in self.corruptions}
        by_severity = {s: float(np.mean([grid[c, s] for c in self.corruptions])) for s in self.severities}
        metrics = {"clean_acc1": clean, "mean_acc1": mean,
                   "relative_robustness": mean / clean if clean > 0 else float("nan")}
        if self.corrupt_size:
            metrics["resampled_acc1"] = acc[RESAMPLED, 0]
        metrics |= {f"acc1_{c}": v for c, v in by_corruption.items()}
        metrics |= {f"acc1_sev{s}": v for s, v in by_severity.items()}
        metrics["images"] = float(n)
        header = ["corruption"] + [f"severity {s}" for s in self.severities] + ["mean"]
        rows = [[c] + [grid[c, s] for s in self.severities] + [by_corruption[c]] for c in self.corruptions]
        rows.append(["mean"] + [by_severity[s] for s in self.severities] + [mean])
        rows.append([CLEAN] + [clean] * len(self.severities) + [clean])
        ms = {f"{c}/{s}": 1000 * seconds[k] / n for k, (c, s) in enumerate(conditions) if c not in (CLEAN, RESAMPLED)}
        per_corruption_ms = {c: float(np.mean([ms[f"{c}/{s}"] for s in self.severities])) for c in self.corruptions}
        details = {"split": split, "images": n, "split_images": total, "skipped_unreadable": skipped,
                   "image_size": size, "corrupt_size": self.corrupt_size, "corruptions": self.corruptions,
                   "severities": self.severities, "seed": self.seed, "max_images": self.max_images,
                   "acc1": {c: {str(s): grid[c, s] for s in self.severities} for c in self.corruptions},
                   "corrupt_ms": per_corruption_ms, "hits": str(hits_file)}
        title = f"robustness: top-1 under corruption ({split}, {n} images at {size} px" + (
            f", corrupted at {self.corrupt_size} px)" if self.corrupt_size else ")")
        return EvalResult(metrics, [Table(title, header, rows)], details)
