"""``eval=linear``: a linear probe on frozen, cached features, the standard way (DINO / DINOv2 linear
evaluation): the features are computed once, then many linear heads, one per (learning rate,
weight decay) of a small grid, train side by side with SGD (momentum 0.9, cosine schedule) on
them. The grid point is chosen on a stratified hold-out of the training split, retrained on the
whole split, and scored on the eval split, so the eval split never picks a hyper-parameter.

Features are standardised with the training split's mean and std (an affine map: the probe's
capacity is unchanged, SGD is better conditioned)."""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from seit.eval.context import EvalContext
from seit.eval.result import EvalResult, Table


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows): ``fraction`` of each class held out (at least one when it has two)."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = int(round(fraction * len(members)))
        held.append(members[:max(n, 1) if len(members) > 1 else 0])
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held), held


def train_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int, grid: list[tuple[float, float]], *, epochs: int,
                batch_size: int, seed: int, desc: str = "linear probe") -> list[nn.Linear]:
    """One linear head [D -> num_classes] per (lr, weight decay) of ``grid``, trained side by side on
    the same shuffled mini-batches of (x [N, D] float32, y [N] int64); SGD momentum 0.9, cosine to 0."""
    g = torch.Generator().manual_seed(seed)
    heads = nn.ModuleList(nn.Linear(x.shape[1], num_classes) for _ in grid).to(x.device)
    for head in heads:
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    opt = torch.optim.SGD([{"params": h.parameters(), "lr": lr, "weight_decay": wd} for h, (lr, wd) in zip(heads, grid)],
                          momentum=0.9)
    steps = epochs * max(1, -(-len(x) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(epochs), desc=desc, disable=None, leave=False):
        order = torch.randperm(len(x), generator=g).to(x.device)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = sum(F.cross_entropy(h(x[idx]), y[idx]) for h in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return list(heads)


@torch.no_grad()
def accuracy(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, k: int = 1) -> float:
    top = head(x).topk(min(k, head.out_features), dim=1).indices
    return float((top == y[:, None]).any(1).float().mean()) if len(y) else 0.0


class LinearProbe:
    """``lrs`` x ``weight_decays``: the grid; ``holdout``: fraction of each training class that picks it."""

    name = "linear"

    def __init__(self, lrs: list[float] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0), weight_decays: list[float] = (0.0, 1e-4),
                 epochs: int = 100, batch_size: int = 256, holdout: float = 0.1, seed: int = 0,
                 train_split: str | None = None, split: str | None = None):
        if not 0 < holdout < 1:
            raise ValueError(f"eval.linear.holdout={holdout} must be in (0, 1)")
        self.grid = list(itertools.product([float(v) for v in lrs], [float(v) for v in weight_decays]))
        if not self.grid:
            raise ValueError("eval.linear: lrs and weight_decays must not be empty")
        self.epochs, self.batch_size, self.holdout, self.seed = int(epochs), int(batch_size), float(holdout), int(seed)
        self.train_split, self.split = train_split, split

    def fit(self, train: np.ndarray, train_labels: np.ndarray, num_classes: int, device) -> tuple[nn.Linear, dict, list]:
        """(the head retrained on all of ``train`` at the best grid point, standardisation, hold-out accuracy per point)."""
        mean, std = train.mean(0), train.std(0) + 1e-6
        x = torch.from_numpy((train - mean) / std).float().to(device)
        y = torch.from_numpy(train_labels).long().to(device)
        fit_rows, held = holdout_split(train_labels, self.holdout, self.seed)
        fit_rows, held = torch.from_numpy(fit_rows).to(device), torch.from_numpy(held).to(device)
        heads = train_heads(x[fit_rows], y[fit_rows], num_classes, self.grid, epochs=self.epochs,
                            batch_size=self.batch_size, seed=self.seed, desc="linear probe: grid")
        scores = [accuracy(h, x[held], y[held]) for h in heads]
        best = int(np.argmax(scores))
        head = train_heads(x, y, num_classes, [self.grid[best]], epochs=self.epochs, batch_size=self.batch_size,
                           seed=self.seed, desc="linear probe: refit")[0]
        return head, {"mean": mean, "std": std, "best": self.grid[best]}, scores

    def __call__(self, ctx: EvalContext) -> EvalResult | None:
        data = ctx.labelled_features(self.name, self.train_split, self.split)
        if data is None:
            return None
        train, train_labels, test, test_labels, train_split, split = data
        n = len(ctx.classes())
        torch.manual_seed(self.seed)
        head, norm, scores = self.fit(train, train_labels, n, ctx.device)
        x = torch.from_numpy((test - norm["mean"]) / norm["std"]).float().to(ctx.device)
        y = torch.from_numpy(test_labels).long().to(ctx.device)
        lr, wd = norm["best"]
        metrics = {"acc1": accuracy(head, x, y, 1), "acc5": accuracy(head, x, y, 5), "best_lr": lr, "best_wd": wd}
        rows = [[lr_, wd_, s, "best" if (lr_, wd_) == (lr, wd) else ""] for (lr_, wd_), s in zip(self.grid, scores)]
        table = Table(f"linear probe: hold-out accuracy per grid point ({train_split}, {self.holdout:.0%} held out); "
                      f"{split} top-1 {metrics['acc1']:.4f} at the best", ["lr", "weight decay", "hold-out top-1", "picked"], rows)
        return EvalResult(metrics, [table], {"grid": [list(p) for p in self.grid], "holdout_acc": scores,
                                             "epochs": self.epochs, "train_split": train_split, "split": split})
