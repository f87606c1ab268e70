"""``eval=pixels``: a token model scored the way it is deployed, on plain image files tokenized on
the fly, side by side with the same samples read from the pre-tokenized shards.

Each sample of the split's shards is matched by key to the image file it was tokenized from
(dataset.json ``source``; ``EvalContext.source_records``), decoded exactly as ``task=tokenize``
does (``load_image`` at the tokenizer's ``image_size``, /255, ``tokenizer.encode``; see
``seit.pipelines.tokenize_shards.encode_records``) and classified; the stored ids of the same
samples are classified in the same batches. The two must agree: the same ids give the same logits.
Reported: top-1 / top-5 of both, their difference, and where they could part, how much:
``ids_equal`` (images whose id grid is identical), ``id_agreement`` (positions), ``pred_agreement``
(top-1 predictions) and ``max_logit_diff`` over the images with identical ids (0 unless the model
is not deterministic). A difference means the images or the decoding changed since tokenize, or the
tokenizer encodes differently on this device (GPU encoding runs in float32 with TF32 off here, but
its convolutions still round differently from the CPU that tokenize ran on; ``tokenize_device=cpu``
repeats tokenize exactly).

Work over ranks: shards ``i % world`` (as ``EvalContext.batches``), results gathered on rank 0.
A rank holds its shards' ids in memory (2 KB per 32x32 sample: 100 MB for ImageNet's val split).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from seit.data.dataset_info import DatasetError
from seit.data.image_source import ImageRecord, load_image
from seit.data.shard_reader import read_shard
from seit.eval.context import EvalContext
from seit.eval.result import EvalResult, Table
from seit.tokenizers.base import ImageEncoder
from seit.utils.validate import ConfigError

log = logging.getLogger(__name__)


def loader_workers(workers, world: int) -> int:
    """Decoding processes per rank: an int, or ``auto`` (this machine's cores shared by the ranks, one
    left to the main process, at most 16; 0 = decode in the main process)."""
    if str(workers) != "auto":
        if int(workers) < 0:
            raise ConfigError(f"workers={workers} must be >= 0 or auto")
        return int(workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cores // max(world, 1)
    return min(16, per_rank - 1) if per_rank > 2 else 0


class ImageInputs:
    """uint8 images ``[B, 3, S, S]`` -> the model's input on ``ctx.device``: the ids of the token
    dataset's own tokenizer (a token model; ``size`` = its ``image_size``) or the images themselves
    (a pixel model; ``size`` = data.image_size). ``tokenize_device``: ``auto`` (the eval device, when
    the tokenizer can move there) or ``cpu`` (as task=tokenize)."""

    def __init__(self, ctx: EvalContext, tokenize_device: str = "auto"):
        self.device = ctx.device
        self.size = ctx.image_size()
        self.encoder = None
        self.tokenize_device = torch.device("cpu")
        if ctx.model.input == "tokens":  # the run's one tokenizer: put where this evaluator wants it
            want = ctx.device if str(tokenize_device) == "auto" else torch.device("cpu")
            tokenizer = ctx.tokenizer()  # needs the token dataset, whose build says the precision
            built = ((ctx.info().meta.get("build") or {}).get("tokenizer") or {}).get("precision", "fp32")
            self.encoder = ImageEncoder(tokenizer, ctx.device, want, precision=built)
            self.tokenize_device = self.encoder.encode_device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device) if self.encoder is None else self.encoder(images)


class DecodedImages(Dataset):
    """``(position, uint8 [3, S, S])`` of each record, decoded as task=tokenize does (``load_image``)."""

    def __init__(self, records: list[ImageRecord], size: int):
        self.records, self.size = records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        return i, torch.from_numpy(load_image(self.records[i], self.size))


def _one_thread(_):
    torch.set_num_threads(1)


class Pixels:
    """``split``: the split scored (default task.split); ``workers``: decoding processes per rank
    (``auto`` or an int); ``tokenize_device``: ``auto`` or ``cpu`` (see ``ImageInputs``)."""

    name = "pixels"
    needs_head = True  # scores class predictions: refused up front for a model without a classifier head

    def __init__(self, split: str | None = None, workers="auto", tokenize_device: str = "auto"):
        if str(tokenize_device) not in ("auto", "cpu"):
            raise ConfigError(f"eval.pixels.tokenize_device={tokenize_device!r} must be auto or cpu")
        self.split, self.workers, self.tokenize_device = split, workers, str(tokenize_device)

    def __call__(self, ctx: EvalContext) -> EvalResult | None:
        model = ctx.model
        if model.input != "tokens":
            raise ConfigError(f"eval=pixels scores a token model on image files; {model.path} is a pixel model, which "
                              "reads images already: use eval=classify on image data (data.kind=images, e.g. "
                              "experiment=tiny20_pixels)")
        split = self.split or str(ctx.cfg.task.split)
        ctx.check_classifier(self.name)
        info = ctx.info()
        if split not in info.meta["splits"]:
            raise DatasetError(f"{info.root} has no split {split!r}; it has {sorted(info.meta['splits'])}")
        by_key = {r.key: r for r in ctx.source_records(split)}
        ids, labels, keys = self._stored(ctx, split)
        records = []
        for key, label in zip(keys, labels):
            record = by_key.get(key)
            if record is None:
                raise DatasetError(f"sample {key} of split {split!r} of {info.root} has no image in its source "
                                   f"{info.meta['source']}: the images are no longer the ones it was tokenized from")
            if record.label != label:
                raise DatasetError(f"{record.where} has label {record.label} in the source, {label} in {info.root}: "
                                   "the source changed since it was tokenized")
            records.append(record)
        inputs = ImageInputs(ctx, self.tokenize_device)
        rows = self._score(ctx, inputs, records, ids, labels, split)  # [n, 9] per sample
        differ = np.array([k for k, same in zip(keys, rows[:, 6]) if not same], dtype=str)
        rows, differ = ctx.gather(rows), ctx.gather(differ.astype("U") if differ.size else np.zeros(0, "U1"))
        if ctx.rank != 0:
            return None
        return self._result(ctx, rows, differ, split, inputs, info)

    def _stored(self, ctx: EvalContext, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """This rank's shards of the split (``i % world``, as ``EvalContext.batches``): ids, labels, keys."""
        info = ctx.info()
        codec = info.load_codec()
        ids, labels, keys = [], [], []
        for spec in info.shard_specs(split)[ctx.rank::ctx.world]:
            for chunk in read_shard(spec, codec):
                ids.append(chunk.ids)
                labels.append(chunk.labels)
                keys += chunk.keys
        if not ids:
            return np.zeros((0, *info.grid), np.uint16), np.zeros(0, np.int64), []
        labels = np.concatenate(labels).astype(np.int64)
        ctx.require_labels(labels, split, self.name)
        return np.concatenate(ids), labels, keys

    @torch.no_grad()
    def _score(self, ctx: EvalContext, inputs: ImageInputs, records: list[ImageRecord], ids: np.ndarray,
               labels: np.ndarray, split: str) -> np.ndarray:
        """Per sample: top-1 and top-5 hits of the fresh ids and of the stored ids, both top-1
        predictions, whether the grids are equal, how many positions agree, and the largest logit
        difference (when the grids are equal)."""
        model = ctx.model
        k = min(5, model.num_classes)
        rows = np.zeros((len(records), 9), np.float64)
        loader = DataLoader(DecodedImages(records, inputs.size), batch_size=ctx.batch_size,
                            num_workers=loader_workers(self.workers, ctx.world), worker_init_fn=_one_thread)
        bar = tqdm(total=len(records), desc=f"pixels {split} (rank {ctx.rank})", unit="image", disable=None,
                   leave=False)
        for positions, images in loader:
            positions = positions.numpy()
            stored = torch.from_numpy(ids[positions].astype(np.int64))
            fresh = inputs(images).cpu()
            if fresh.shape != stored.shape:
                raise DatasetError(f"the tokenizer makes {tuple(fresh.shape[1:])} id grids, {ctx.data_name()} holds "
                                   f"{tuple(stored.shape[1:])}: it is not the tokenizer of this dataset")
            y = torch.from_numpy(labels[positions])
            with ctx.autocast():  # two calls of one shape: equal ids must give bit-equal logits
                logits_fresh = model.logits(fresh.to(ctx.device)).float().cpu()
                logits_stored = model.logits(stored.to(ctx.device)).float().cpu()
            same = (fresh == stored).flatten(1)
            equal = same.all(1)
            diff = (logits_fresh - logits_stored).abs().amax(1) * equal
            for col, logits in ((0, logits_fresh), (2, logits_stored)):
                top = logits.topk(k, dim=1).indices
                rows[positions, col] = (top[:, 0] == y).numpy()
                rows[positions, col + 1] = (top == y[:, None]).any(1).numpy()
                rows[positions, 4 + col // 2] = top[:, 0].numpy()
            rows[positions, 6] = equal.numpy()
            rows[positions, 7] = same.float().mean(1).numpy()
            rows[positions, 8] = diff.numpy()
            bar.update(len(positions))
        bar.close()
        return rows

    def _result(self, ctx: EvalContext, rows: np.ndarray, differ: np.ndarray, split: str, inputs: ImageInputs,
                info) -> EvalResult:
        n = len(rows)
        if n == 0:
            raise DatasetError(f"split {split!r} of {ctx.data_name()} holds no sample to score")
        k = min(5, ctx.model.num_classes)
        acc1, acc5, tok1, tok5 = (float(rows[:, c].mean()) for c in range(4))
        metrics = {"acc1": acc1, f"acc{k}": acc5, "tokens_acc1": tok1, f"tokens_acc{k}": tok5,
                   "acc1_diff": acc1 - tok1, f"acc{k}_diff": acc5 - tok5,
                   "ids_equal": float(rows[:, 6].mean()), "id_agreement": float(rows[:, 7].mean()),
                   "pred_agreement": float((rows[:, 4] == rows[:, 5]).mean()),
                   "max_logit_diff": float(rows[:, 8].max()), "samples": float(n)}
        if metrics["ids_equal"] < 1 or acc1 != tok1:
            log.warning("eval=pixels: %d of %d images tokenize to other ids than %s holds (%.4f%% of positions "
                        "differ; top-1 %.4f vs %.4f), e.g. %s: the images, their decoding or the tokenizer's device "
                        "(%s; tokenize ran on the CPU) differ from tokenize", len(differ), n, info.root,
                        100 * (1 - metrics["id_agreement"]), acc1, tok1, ", ".join(differ[:3]), inputs.tokenize_device)
        table = Table(f"pixels: image files tokenized now vs the pre-tokenized shards ({split})",
                      ["input", "samples", "top-1", f"top-{k}"],
                      [["image files, tokenized now", n, acc1, acc5], ["pre-tokenized shards", n, tok1, tok5],
                       ["difference", "", acc1 - tok1, acc5 - tok5]])
        details = {"split": split, "source": info.meta.get("source"), "tokenizer": str(ctx.cfg.task.get("tokenizer")
                   or (info.meta.get("tokenizer") or {}).get("checkpoint")), "image_size": inputs.size,
                   "tokenize_device": str(inputs.tokenize_device), "ids_differ": len(differ),
                   "ids_differ_examples": differ[:20].tolist(),
                   "dataset_skipped_images": int((info.meta.get("skipped") or {}).get("count", 0))}
        return EvalResult(metrics, [table], details)
