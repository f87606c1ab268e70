"""``eval=fewshot``: k shots per class, a logistic regression (scikit-learn) on frozen, L2-normalised
features, scored on the whole eval split; mean ± std over ``draws`` stratified draws (the few-shot
linear protocol of e.g. SimCLR / DINOv2's low-shot tables)."""

from __future__ import annotations

import numpy as np

from seit.data.dataset_info import DatasetError
from seit.eval.context import EvalContext
from seit.eval.result import EvalResult, Table


def draw_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of exactly ``shots`` samples of every class present in ``labels``, sorted; the same
    ``seed`` gives the same draw. DatasetError when a class has fewer samples than ``shots``."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise DatasetError(f"eval=fewshot: class {int(c)} has {len(members)} training samples, fewer than "
                               f"{shots} shots")
        picked.append(rng.choice(members, size=shots, replace=False))
    return np.sort(np.concatenate(picked))


class FewShot:
    """``shots``: samples per class; ``draws``: repetitions with different samples (seeds seed..seed+draws-1);
    ``C``: inverse regularisation of the logistic regression."""

    name = "fewshot"

    def __init__(self, shots: list[int] = (1, 5, 10), draws: int = 5, C: float = 1.0, seed: int = 0,
                 max_iter: int = 1000, train_split: str | None = None, split: str | None = None):
        if not shots or min(shots) < 1 or draws < 1:
            raise ValueError(f"eval.fewshot: shots={list(shots)} and draws={draws} must be positive")
        self.shots, self.draws, self.C, self.seed, self.max_iter = [int(s) for s in shots], int(draws), float(C), \
            int(seed), int(max_iter)
        self.train_split, self.split = train_split, split

    def __call__(self, ctx: EvalContext) -> EvalResult | None:
        from sklearn.linear_model import LogisticRegression

        data = ctx.labelled_features(self.name, self.train_split, self.split)
        if data is None:
            return None
        train, train_labels, test, test_labels, train_split, split = data
        train, test = _unit(train), _unit(test)
        metrics, rows, details = {}, [], {}
        for shots in self.shots:
            accs = []
            for draw in range(self.draws):
                pick = draw_shots(train_labels, shots, self.seed + draw)
                clf = LogisticRegression(C=self.C, max_iter=self.max_iter)
                clf.fit(train[pick], train_labels[pick])
                accs.append(float((clf.predict(test) == test_labels).mean()))
            mean, std = float(np.mean(accs)), float(np.std(accs))
            metrics[f"acc1_{shots}shot"], metrics[f"acc1_{shots}shot_std"] = mean, std
            rows.append([shots, self.draws, mean, std])
            details[f"{shots}shot"] = accs
        table = Table(f"few-shot logistic regression ({train_split} -> {split}, C={self.C})",
                      ["shots per class", "draws", "top-1 mean", "std"], rows)
        return EvalResult(metrics, [table], {"per_draw": details, "seeds": [self.seed + d for d in range(self.draws)]})


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
