"""Spherical k-means at scale: train on a sample, then assign every point in streamed chunks.

The k-means itself is ``seit.utils.kmeans.kmeans(spherical=True)``: faiss in one process (on the
GPU when faiss sees one), as SemDeDup does; with several ranks, torch Lloyd iterations over each
rank's slice of the sample, sums all-reduced in float64. Centroids are normalised every
iteration: cosine is an inner product only between unit vectors (checklist item 1). Assignment is
the shared nearest-code search, chunked, so N only costs O(N) memory for the labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from seit.utils.kmeans import kmeans, sample_indices
from seit.utils.knn import torch_device
from seit.utils.nearest import nearest_code


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def assign_chunk(x: np.ndarray, centroids: np.ndarray, top: int = 1, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(labels [n, top] int64, cosine similarities [n, top] float32) of the ``top`` nearest of the
    unit ``centroids`` [k, d] float32 to the rows of ``x`` [n, d] (normalised here), best first.

    Any n: ``nearest_code`` scores a bounded block of rows at a time, on ``torch_device(device)``
    (the GPU when torch sees one, unless ``device="cpu"``).
    """
    dev = torch_device(device)
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    label, score = nearest_code(x, torch.from_numpy(centroids).to(dev), metric="cosine", top=top, with_scores=True)
    return label.numpy(), score.numpy()


@dataclass
class Clusters:
    """Every point's cluster and similarity to its centroid, plus the canonical order.

    ``order`` lists the points cluster by cluster, each cluster sorted by **descending distance to
    its centroid** (the farthest first; ties by index): SemDeDup keeps the first member of a
    duplicate group and DBP keeps the first x_j, so both keep the least prototypical (checklist 4).
    """

    centroids: np.ndarray  # [k, d] unit
    label: np.ndarray  # int64 [N]
    sim: np.ndarray  # float32 [N], cosine to the own centroid
    order: np.ndarray  # int64 [N]
    bounds: np.ndarray  # int64 [k + 1]: cluster j is order[bounds[j]:bounds[j+1]]

    @property
    def k(self) -> int:
        return len(self.centroids)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.bounds)

    def members(self, j: int) -> np.ndarray:
        return self.order[self.bounds[j]:self.bounds[j + 1]]

    @classmethod
    def from_labels(cls, centroids: np.ndarray, label: np.ndarray, sim: np.ndarray) -> "Clusters":
        order = np.lexsort((np.arange(len(label)), sim, label))  # by cluster, then ascending similarity
        bounds = np.concatenate([[0], np.cumsum(np.bincount(label, minlength=len(centroids)))])
        return cls(centroids, label.astype(np.int64), sim.astype(np.float32), order.astype(np.int64), bounds.astype(np.int64))


def cluster(store, k: int, niter: int = 50, seed: int = 0, sample_per_centroid: int = 256, backend: str = "auto",
            chunk: int = 1 << 16, progress=None, device: str = "auto") -> Clusters:
    """k-means on a sample of ``store`` (an Embeddings), then assign every row, streamed in chunks.

    The sample is ``sample_per_centroid * k`` rows (faiss's default cap, 256); with several ranks
    each trains on its share of it and assigns its contiguous slice of the rows. ``device``
    (``curate.device``: auto | cpu | cuda) is where the k-means and the assignment run.
    """
    n = len(store)
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    idx = sample_indices(n, sample_per_centroid * k, seed)
    part = np.array_split(idx, world)[rank]
    centroids = kmeans(np.asarray(store.vectors[part], dtype=np.float32), k, niter=niter, seed=seed,
                       spherical=True, backend=backend, device=device)
    label, sim = np.empty(n, np.int64), np.empty(n, np.float32)
    lo, hi = round(n * rank / world), round(n * (rank + 1) / world)
    for start in range(lo, hi, chunk):
        stop = min(start + chunk, hi)
        lab, s = assign_chunk(store.vectors[start:stop], centroids, device=device)
        label[start:stop], sim[start:stop] = lab[:, 0], s[:, 0]
        if progress is not None:
            progress(stop - start)
    if world > 1:  # every rank ends with every label: gather the slices
        parts = [None] * world
        dist.all_gather_object(parts, (lo, label[lo:hi], sim[lo:hi]))
        for start, lab, s in parts:
            label[start:start + len(lab)], sim[start:start + len(s)] = lab, s
    return Clusters.from_labels(centroids, label, sim)
