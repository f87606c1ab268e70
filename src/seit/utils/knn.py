"""Weighted k-NN classification on frozen features, the DINO protocol (Caron et al. 2021, §4.1 and its
eval_knn): cosine similarity of L2-normalised features; the k nearest memory rows vote with weight
exp(sim / T). The search is faiss (exact inner product). ``eval=knn`` and the self-supervised tasks'
validation monitor both score with it.

It is also the one place that answers "which device, which faiss" for curation (``torch_device``,
``faiss_gpus``, ``flat_ip_index``): faiss's GPU index when faiss-gpu is installed and sees a GPU,
torch on cuda for the dense maths when torch sees one, each unless ``curate.device=cpu``."""

from __future__ import annotations

import logging

import numpy as np
import torch

DEVICES = ("auto", "cpu", "cuda")
GPU_FAISS_MAX_K = 2048  # faiss GPU flat search answers at most this many neighbours per query


def faiss_module():
    """faiss, without its loader's INFO tracebacks about the CPU variants it could not load."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def _check(device: str) -> str:
    device = str(device)
    if device not in DEVICES:
        raise ValueError(f"curate.device must be one of {DEVICES}, got {device!r}")
    return device


def torch_device(device: str = "auto") -> torch.device:
    """The torch device of curation's dense maths (SemDeDup's in-cluster similarity, retrieval's
    k-NN, the k-means assignment and torch Lloyd): ``"auto"`` is cuda when torch sees a GPU, else
    cpu. Raises ValueError for an unknown name, or ``"cuda"`` on a machine without one."""
    device = _check(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("curate.device=cuda, but torch sees no GPU (use curate.device=auto or cpu)")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def faiss_gpus(device: str = "auto") -> int:
    """GPUs faiss may use: faiss's own count (0 for faiss-cpu, the default install; faiss-gpu sees
    them) when ``device`` is ``"auto"`` or ``"cuda"``, 0 for ``"cpu"``."""
    if _check(device) == "cpu":
        return 0
    faiss = faiss_module()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def flat_ip_index(dim: int, device: str = "auto", k: int = 1):
    """An exact inner-product faiss index of ``dim``-d float32 rows: ``GpuIndexFlatIP`` on GPU 0
    when ``faiss_gpus(device)`` and ``k`` (neighbours asked per query) <= 2048, else ``IndexFlatIP``.
    Both answer the same exact search (scores may differ in the last float32 bits)."""
    faiss = faiss_module()
    if faiss_gpus(device) and k <= GPU_FAISS_MAX_K:
        return faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), dim)
    return faiss.IndexFlatIP(dim)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, k: int, temperature: float,
                num_classes: int, exclude_self: bool = False, device: str = "cpu") -> np.ndarray:
    """Class scores [Q, num_classes] of each query row from its k nearest training rows.

    ``train`` [N, D], ``query`` [Q, D]: float32, L2-normalised here (cosine similarity).
    ``exclude_self``: ``query`` is ``train`` (Q = N) and row i never votes for itself: leave-one-out
    k-NN, a label-using monitor that needs no second split.
    ``device``: ``"cpu"`` (default) searches with faiss-cpu; ``"auto"``/``"cuda"`` on the GPU when
    faiss-gpu is installed (``flat_ip_index``).
    """
    if exclude_self and len(query) != len(train):
        raise ValueError(f"exclude_self needs query = train, got {len(query)} and {len(train)} rows")
    k = min(k, len(train) - int(exclude_self))
    if k < 1:
        return np.zeros((len(query), num_classes), np.float64)
    index = flat_ip_index(train.shape[1], device, k=k + int(exclude_self))
    index.add(unit_rows(train))
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
