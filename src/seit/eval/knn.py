"""``eval=knn``: weighted k-NN on frozen features, the DINO protocol (Caron et al. 2021, §4.1 and
its eval_knn; ``seit.utils.knn``): the k nearest training samples vote with weight exp(sim / T),
T = 0.07, k = 10 and 20."""

from __future__ import annotations

import numpy as np

from seit.eval.context import EvalContext
from seit.eval.result import EvalResult, Table
from seit.utils.knn import knn_predict


class KNN:
    """``ks``: the k values reported; ``temperature``: T of the vote weights; ``train_split`` /
    ``split``: the memory and the queries (default task.train_split / task.split)."""

    name = "knn"

    def __init__(self, ks: list[int] = (10, 20), temperature: float = 0.07, train_split: str | None = None,
                 split: str | None = None):
        if not ks or min(ks) < 1:
            raise ValueError(f"eval.knn.ks={list(ks)} must be positive integers")
        if temperature <= 0:
            raise ValueError(f"eval.knn.temperature={temperature} must be > 0")
        self.ks, self.temperature = [int(k) for k in ks], float(temperature)
        self.train_split, self.split = train_split, split

    def __call__(self, ctx: EvalContext) -> EvalResult | None:
        data = ctx.labelled_features(self.name, self.train_split, self.split)
        if data is None:
            return None
        train, train_labels, query, labels, train_split, split = data
        n = len(ctx.classes())
        metrics, rows = {}, []
        for k in self.ks:
            scores = knn_predict(train, train_labels, query, k, self.temperature, n)
            top = np.argsort(-scores, axis=1)[:, :min(5, n)]
            acc1 = float((top[:, 0] == labels).mean())
            acc5 = float((top == labels[:, None]).any(1).mean())
            metrics[f"acc1_k{k}"], metrics[f"acc5_k{k}"] = acc1, acc5
            rows.append([k, acc1, acc5])
        table = Table(f"k-NN on frozen features ({train_split} -> {split}, T={self.temperature})",
                      ["k", "top-1", "top-5"], rows)
        return EvalResult(metrics, [table], {"train_split": train_split, "split": split, "train_samples": len(train),
                                             "samples": len(query), "temperature": self.temperature})
