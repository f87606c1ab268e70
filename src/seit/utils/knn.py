"""Weighted k-NN classification on frozen features, the DINO protocol (Caron et al. 2021, §4.1 and its
eval_knn): cosine similarity of L2-normalised features; the k nearest memory rows vote with weight
exp(sim / T). The search is faiss (exact inner product). ``eval=knn`` and the self-supervised tasks'
validation monitor both score with it."""

from __future__ import annotations

import numpy as np


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, k: int, temperature: float,
                num_classes: int, exclude_self: bool = False) -> np.ndarray:
    """Class scores [Q, num_classes] of each query row from its k nearest training rows.

    ``train`` [N, D], ``query`` [Q, D]: float32, L2-normalised here (cosine similarity).
    ``exclude_self``: ``query`` is ``train`` (Q = N) and row i never votes for itself: leave-one-out
    k-NN, a label-using monitor that needs no second split.
    """
    import faiss

    if exclude_self and len(query) != len(train):
        raise ValueError(f"exclude_self needs query = train, got {len(query)} and {len(train)} rows")
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(unit_rows(train))
    k = min(k, len(train) - int(exclude_self))
    if k < 1:
        return np.zeros((len(query), num_classes), np.float64)
    sims, nearest = index.search(unit_rows(query), k + int(exclude_self))
    if exclude_self:  # drop row i from its own list (not always first: exact duplicates tie with it)
        own = nearest == np.arange(len(query))[:, None]
        own[~own.any(1), -1] = True  # when i is not in its list, drop the farthest one instead
        keep = ~own
        sims, nearest = sims[keep].reshape(len(query), k), nearest[keep].reshape(len(query), k)
    weights = np.exp(sims / temperature)
    scores = np.zeros((len(query), num_classes), np.float64)
    np.add.at(scores, (np.repeat(np.arange(len(query)), k), train_labels[nearest].reshape(-1)), weights.reshape(-1))
    return scores
