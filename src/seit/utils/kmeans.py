"""k-means: the one implementation behind the patch tokenizer's codebook and curation's clusters.

One process: faiss ``Kmeans`` (on the GPU when faiss sees one; faiss-cpu is a declared
dependency). Several ranks (torch.distributed initialised): Lloyd iterations in torch, each
rank holding its slice of the points, per-cluster sums and counts all-reduced in float64
(Vo et al.), so the centroids come out the same on every rank. ``spherical`` (SemDeDup's
clustering) normalises the points and the centroids every iteration: cosine is an inner product
only between unit vectors. In the torch Lloyd an empty cluster keeps its previous centroid;
faiss re-seeds it by splitting a large one.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from seit.utils.nearest import nearest_code

BACKENDS = ("auto", "faiss", "torch")
INITS = ("random", "kmeans++")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """A sorted, seeded sample of ``size`` distinct row indices out of ``n`` (all of them when
    ``size >= n``); sorted, so that memmap reads stay sequential."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def kmeans(x: np.ndarray, k: int, *, niter: int, seed: int, spherical: bool = False, init: str = "random",
           backend: str = "auto") -> np.ndarray:
    """k centroids of the rows of ``x`` (this rank's part of them when torch.distributed is initialised).

    Args:
        x: ``[n, d]`` points (cast to float32).
        k: clusters, 1 <= k <= the points over all ranks.
        niter: Lloyd iterations.
        seed: seeds the initial centroids (faiss's own random pick, or the torch backend's
            ``sample_indices``, or k-means++); the same seed and points give the same centroids.
        spherical: cluster by cosine: unit points and unit centroids (SemDeDup, Vo et al.);
            otherwise by squared euclidean distance.
        init: ``"random"``: k distinct points; ``"kmeans++"`` (greedy, one process only, and
            O(k n log k) on top of Lloyd, so meant for small k, e.g. a hierarchy's upper levels).
        backend: ``"faiss"`` (one process), ``"torch"`` (Lloyd; the only one for several ranks)
            or ``"auto"``: torch when distributed, else faiss.

    Returns:
        float32 ``[k, d]`` centroids, unit rows when ``spherical``.

    Raises:
        ValueError: an unknown backend or init, kmeans++ or faiss with several ranks, or k
            outside [1, number of points].
    """
    if backend not in BACKENDS:
        raise ValueError(f"k-means backend must be one of {BACKENDS}, got {backend!r}")
    if init not in INITS:
        raise ValueError(f"k-means init must be one of {INITS}, got {init!r}")
    if init == "kmeans++" and _distributed():
        raise ValueError("k-means++ init runs in one process; with several ranks use init=random")
    if backend == "auto":
        backend = "torch" if _distributed() else "faiss"
    if backend == "faiss" and _distributed():
        raise ValueError("k-means backend faiss runs in one process; with several ranks use torch")
    total = int(_all_sum(torch.tensor([len(x)], dtype=torch.float64))[0])
    if not 1 <= k <= total:
        raise ValueError(f"k-means with k={k} needs 1 <= k <= the {total} training points")
    x = np.ascontiguousarray(x, dtype=np.float32)
    start = kmeans_pp(x, k, seed, spherical) if init == "kmeans++" else None
    if backend == "faiss":
        return _faiss_kmeans(x, k, niter, seed, spherical, start)
    return _torch_kmeans(torch.from_numpy(x), k, niter, seed, spherical, start)


def kmeans_pp(x: np.ndarray, k: int, seed: int, spherical: bool = False) -> np.ndarray:
    """k initial centres ``[k, d]`` float32, picked from the rows of ``x`` by greedy k-means++
    (as scikit-learn): the first uniformly, then each the best of 2 + ln k candidates drawn with
    probability proportional to the squared distance to the nearest centre (2 - 2 cos when
    ``spherical``, where the rows are normalised first), the best lowering the total potential most."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if spherical:
        x = F.normalize(x, dim=1)
    x2 = None if spherical else (x * x).sum(1)

    def sq_dist(c: torch.Tensor) -> torch.Tensor:  # c: [d] or [m, d] -> [n] or [n, m], float64
        dot = x @ (c.T if c.ndim == 2 else c)
        if spherical:
            return (2 - 2 * dot).clamp_min(0).double()
        c2 = (c * c).sum(-1)
        return (x2[:, None] + c2 - 2 * dot if c.ndim == 2 else x2 + c2 - 2 * dot).clamp_min(0).double()

    trials = 2 + int(np.log(k))
    centres = [int(rng.integers(len(x)))]
    d2 = sq_dist(x[centres[0]])
    for _ in range(1, k):
        p = (d2 / d2.sum()).numpy() if d2.sum() > 0 else None
        cand = rng.choice(len(x), trials, p=p)
        new = torch.minimum(d2[:, None], sq_dist(x[cand]))  # [n, trials]
        best = int(new.sum(0).argmin())
        centres.append(int(cand[best]))
        d2 = new[:, best]
    return x[centres].numpy()


def _faiss():
    """faiss, without its loader's INFO tracebacks about the CPU variants it could not load."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def _faiss_kmeans(x: np.ndarray, k: int, niter: int, seed: int, spherical: bool,
                  start: np.ndarray | None) -> np.ndarray:
    faiss = _faiss()
    # max_points_per_centroid: all of x, no subsampling by faiss (the callers sample)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=spherical, gpu=faiss.get_num_gpus() > 0,
                      max_points_per_centroid=max(256, -(-len(x) // k)), verbose=False)
    km.train(x, init_centroids=start)
    return _unit(km.centroids) if spherical else np.ascontiguousarray(km.centroids, dtype=np.float32)


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
        out = t.to(dev)
        dist.all_reduce(out)
        return out.to(t.device)
    return t


def _torch_kmeans(x: torch.Tensor, k: int, niter: int, seed: int, spherical: bool, start: np.ndarray | None,
                  chunk: int = 1 << 16) -> np.ndarray:
    if spherical:
        x = F.normalize(x, dim=1)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if start is not None:
        return _lloyd(x, torch.from_numpy(start).to(dev), niter, spherical, chunk)
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
    return _lloyd(x, _all_sum(init).float().to(dev), niter, spherical, chunk)


def _lloyd(x: torch.Tensor, centroids: torch.Tensor, niter: int, spherical: bool, chunk: int) -> np.ndarray:
    """Lloyd iterations; sums and counts in float64, all-reduced over ranks."""
    dev, k = centroids.device, len(centroids)
    metric = "ip" if spherical else "l2"
    for _ in range(niter):
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=dev)
        sizes = torch.zeros(k, dtype=torch.float64, device=dev)
        for start in range(0, len(x), chunk):
            block = x[start:start + chunk].to(dev)
            label = nearest_code(block, centroids, metric=metric)
            sums.index_add_(0, label, block.double())
            sizes.index_add_(0, label, torch.ones_like(label, dtype=torch.float64))
        sums, sizes = _all_sum(sums.cpu()), _all_sum(sizes.cpu())
        new = F.normalize(sums, dim=1) if spherical else sums / sizes.clamp_min(1)[:, None]
        centroids = torch.where((sizes > 0)[:, None].to(dev), new.float().to(dev), centroids)
    return centroids.cpu().numpy()


def _unit(c: np.ndarray) -> np.ndarray:
    return (c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)).astype(np.float32)
