"""Spherical k-means at scale: train on a sample, then assign every point in streamed chunks.

One process: faiss ``Kmeans(spherical=True)`` (on the GPU when faiss sees one), as SemDeDup does.
Several ranks (torch.distributed initialised): Lloyd iterations in torch, each rank holding its
slice of the sample, per-cluster sums and counts all-reduced in float64 (Vo et al.), so the
centroids come out the same on every rank. Both normalise centroids every iteration: cosine is
an inner product only between unit vectors (checklist item 1). An empty cluster keeps its
previous centroid. Assignment is chunked, so N only costs O(N) memory for the labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

BACKENDS = ("auto", "faiss", "torch")
INITS = ("random", "kmeans++")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """A sorted, seeded sample of row indices (sorted: memmap reads stay sequential)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def train_kmeans(x: np.ndarray, k: int, niter: int = 50, seed: int = 0, backend: str = "auto",
                 init: str = "random") -> np.ndarray:
    """Unit-norm centroids [k, d] float32 from the rows of x (this rank's part when distributed).

    ``init``: k distinct random points (faiss's own), or k-means++ (Vo et al.; one process only,
    and O(k n log k) on top of Lloyd, so meant for the small upper levels of a hierarchy).
    """
    if backend not in BACKENDS:
        raise ValueError(f"curate.kmeans.backend must be one of {BACKENDS}, got {backend!r}")
    if init not in INITS:
        raise ValueError(f"k-means init must be one of {INITS}, got {init!r}")
    if init == "kmeans++" and _distributed():
        raise ValueError("k-means++ init runs in one process; with several ranks use init=random")
    if backend == "auto":
        backend = "torch" if _distributed() else "faiss"
    total = int(_all_sum(torch.tensor([len(x)], dtype=torch.float64))[0])
    if not 1 <= k <= total:
        raise ValueError(f"k-means with k={k} needs 1 <= k <= the {total} training points")
    start = kmeans_pp(np.asarray(x, np.float32), k, seed) if init == "kmeans++" else None
    if backend == "faiss":
        if _distributed():
            raise ValueError("curate.kmeans.backend=faiss runs in one process; with several ranks use torch")
        return _faiss_kmeans(np.ascontiguousarray(x, dtype=np.float32), k, niter, seed, start)
    return _torch_kmeans(torch.from_numpy(np.asarray(x, dtype=np.float32)), k, niter, seed, start)


def kmeans_pp(x: np.ndarray, k: int, seed: int, chunk: int = 1 << 16) -> np.ndarray:
    """Greedy k-means++ (as scikit-learn): the first centre uniform, then 2 + ln k candidates drawn
    with probability proportional to the squared distance to the nearest centre (2 - 2 cos on the
    sphere), keeping the candidate that lowers the total potential most."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    x = F.normalize(x, dim=1)
    trials = 2 + int(np.log(k))
    centres = [int(rng.integers(len(x)))]
    d2 = (2 - 2 * (x @ x[centres[0]])).clamp_min(0).double()
    for _ in range(1, k):
        p = (d2 / d2.sum()).numpy() if d2.sum() > 0 else None
        cand = rng.choice(len(x), trials, p=p)
        cand_d2 = (2 - 2 * (x @ x[cand].T)).clamp_min(0).double()  # [n, trials]
        new = torch.minimum(d2[:, None], cand_d2)
        best = int(new.sum(0).argmin())
        centres.append(int(cand[best]))
        d2 = new[:, best]
    return x[centres].numpy()


def _faiss():
    """faiss, without its loader's INFO tracebacks about the CPU variants it could not load."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def _faiss_kmeans(x: np.ndarray, k: int, niter: int, seed: int, start: np.ndarray | None = None) -> np.ndarray:
    faiss = _faiss()

    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, gpu=faiss.get_num_gpus() > 0,
                      max_points_per_centroid=max(256, -(-len(x) // k)), verbose=False)  # the sample is ours
    km.train(x, init_centroids=start)
    return _unit(km.centroids)


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
        out = t.to(dev)
        dist.all_reduce(out)
        return out.to(t.device)
    return t


def _torch_kmeans(x: torch.Tensor, k: int, niter: int, seed: int, start: np.ndarray | None = None,
                  chunk: int = 1 << 16) -> np.ndarray:
    x = F.normalize(x, dim=1)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if start is not None:
        return _lloyd(x, torch.from_numpy(start).to(dev), niter, chunk)
    # init: k distinct points drawn over all ranks' rows with one seed, gathered by a sum
    counts = [len(x)]
    if _distributed():
        counts = [0] * dist.get_world_size()
        dist.all_gather_object(counts, len(x))
    offset = sum(counts[: dist.get_rank()]) if _distributed() else 0
    pick = torch.from_numpy(sample_indices(sum(counts), k, seed))
    mine = pick[(pick >= offset) & (pick < offset + len(x))] - offset
    init = torch.zeros(k, x.shape[1], dtype=torch.float64)
    slots = torch.nonzero((pick >= offset) & (pick < offset + len(x))).flatten()
    init[slots] = x[mine].double()
    return _lloyd(x, _all_sum(init).float().to(dev), niter, chunk)


def _lloyd(x: torch.Tensor, centroids: torch.Tensor, niter: int, chunk: int) -> np.ndarray:
    """Spherical Lloyd iterations; sums and counts in float64, all-reduced over ranks."""
    dev, k = centroids.device, len(centroids)
    for _ in range(niter):
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=dev)
        sizes = torch.zeros(k, dtype=torch.float64, device=dev)
        for start in range(0, len(x), chunk):
            block = x[start:start + chunk].to(dev)
            label = (block @ centroids.T).argmax(1)
            sums.index_add_(0, label, block.double())
            sizes.index_add_(0, label, torch.ones_like(label, dtype=torch.float64))
        sums, sizes = _all_sum(sums.cpu()), _all_sum(sizes.cpu())
        new = F.normalize(sums, dim=1).float().to(dev)
        centroids = torch.where((sizes > 0)[:, None].to(dev), new, centroids)
    return centroids.cpu().numpy()


def _unit(c: np.ndarray) -> np.ndarray:
    return (c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def assign_chunk(x: np.ndarray, centroids: np.ndarray, top: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(labels [n, top] int64, cosine similarities [n, top] float32) of the nearest centroids."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
    sims = F.normalize(x, dim=1) @ torch.from_numpy(centroids).to(dev).T
    score, label = sims.topk(top, dim=1)
    return label.cpu().numpy(), score.cpu().numpy()


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
            chunk: int = 1 << 16, progress=None) -> Clusters:
    """k-means on a sample of ``store`` (an Embeddings), then assign every row, streamed in chunks.

    The sample is ``sample_per_centroid * k`` rows (faiss's default cap, 256); with several ranks
    each trains on its share of it and assigns its contiguous slice of the rows.
    """
    n = len(store)
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    idx = sample_indices(n, sample_per_centroid * k, seed)
    part = np.array_split(idx, world)[rank]
    centroids = train_kmeans(np.asarray(store.vectors[part], dtype=np.float32), k, niter, seed, backend)
    label, sim = np.empty(n, np.int64), np.empty(n, np.float32)
    lo, hi = round(n * rank / world), round(n * (rank + 1) / world)
    for start in range(lo, hi, chunk):
        stop = min(start + chunk, hi)
        lab, s = assign_chunk(store.vectors[start:stop], centroids)
        label[start:stop], sim[start:stop] = lab[:, 0], s[:, 0]
        if progress is not None:
            progress(stop - start)
    if world > 1:  # every rank ends with every label: gather the slices
        parts = [None] * world
        dist.all_gather_object(parts, (lo, label[lo:hi], sim[lo:hi]))
        for start, lab, s in parts:
            label[start:start + len(lab)], sim[start:start + len(s)] = lab, s
    return Clusters.from_labels(centroids, label, sim)
