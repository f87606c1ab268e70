"""``eval=classify``: a classifier's top-1 / top-5, per-class accuracy and confusion matrix on a split
(any token split for a token model, any image split for a pixel model)."""

from __future__ import annotations

import numpy as np
import torch
import torchmetrics

from seit.data.dataset_info import DatasetError
from seit.eval.context import EvalContext
from seit.eval.result import EvalResult, Table
from seit.utils.io import atomic_open


class Classify:
    """``split``: the split scored (default: task.split, the val split)."""

    name = "classify"
    needs_head = True  # scores class predictions: refused up front for a model without a classifier head

    def __init__(self, split: str | None = None):
        self.split = split

    def __call__(self, ctx: EvalContext) -> EvalResult | None:
        split = self.split or str(ctx.cfg.task.split)
        ctx.check_classifier(self.name)
        model, classes = ctx.model, ctx.classes()
        n = model.num_classes
        confusion = torchmetrics.ConfusionMatrix(task="multiclass", num_classes=n)
        k, hits5 = min(5, n), 0
        with torch.no_grad():
            for x, y in ctx.batches(split, desc=f"classify {split}"):
                ctx.require_labels(y.numpy(), split, self.name)
                with ctx.autocast():
                    logits = model.logits(x.to(ctx.device)).float().cpu()
                confusion.update(logits, y)
                hits5 += int((logits.topk(k, dim=1).indices == y[:, None]).any(1).sum())
        matrix = confusion.compute().numpy().astype(np.int64) if confusion.update_count else np.zeros((n, n), np.int64)
        matrix, hits5 = ctx.gather(matrix[None]), ctx.gather(np.array([hits5]))
        if ctx.rank != 0:
            return None
        matrix, total = matrix.sum(0), int(matrix.sum())
        if total == 0:
            raise DatasetError(f"split {split!r} of {ctx.data_name()} holds no sample to classify")
        per_class = np.diag(matrix) / np.maximum(matrix.sum(1), 1)
        present = matrix.sum(1) > 0
        out = ctx.output_dir / self.name
        out.mkdir(parents=True, exist_ok=True)
        with atomic_open(out / f"confusion_{split}.csv") as f:
            f.write(("true\\pred," + ",".join(classes) + "\n").encode())
            for name, row in zip(classes, matrix):
                f.write((name + "," + ",".join(map(str, row)) + "\n").encode())
        metrics = {"acc1": float(np.trace(matrix) / total), f"acc{k}": float(hits5.sum() / total),
                   "mean_class_acc": float(per_class[present].mean()), "samples": float(total)}
        rows = [[c, int(matrix[i].sum()), float(per_class[i])] for i, c in enumerate(classes)]
        return EvalResult(metrics, [Table(f"classify: per-class accuracy on {split}", ["class", "samples", "accuracy"],
                                          rows)],
                          {"split": split, "per_class_acc": dict(zip(classes, per_class.tolist())),
                           "confusion_csv": str(out / f"confusion_{split}.csv")})
