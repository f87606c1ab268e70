"""k-means: the one implementation behind the patch tokenizer's codebook and curation's clusters.

One process: faiss ``Kmeans`` (on the GPU when faiss sees one; faiss-cpu is a declared
dependency). Several ranks (torch.distributed initialised): Lloyd iterations in torch, each
rank holding its slice of the points, per-cluster sums and counts all-reduced in float64
(Vo et al.), so the centroids come out the same on every rank. ``spherical`` (SemDeDup's
clustering) normalises the points and the centroids every iteration: cosine is an inner product
only between unit vectors. In the torch Lloyd an empty cluster keeps its previous centroid;
faiss re-seeds it by splitting a large one.

Rows too many for RAM (a float16 memmap of embeddings) are passed as ``Rows``: the torch Lloyd,
its random init and k-means++ then stream them a block at a time, so memory is one block plus
the centroids and O(N) per-point numbers, never N x D float32. ``device`` (auto | cpu | cuda)
picks where the torch maths runs and whether faiss may use its GPU (``seit.utils.knn``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from seit.utils.knn import faiss_gpus, faiss_module, torch_device
from seit.utils.nearest import nearest_code

BACKENDS = ("auto", "faiss", "torch")
INITS = ("random", "kmeans++")
CHUNK = 1 << 16  # rows per streamed block


class Rows:
    """The rows of an ``[N, D]`` array or memmap (any float dtype, e.g. a float16 embeddings store),
    optionally only those at the sorted positions ``index``, read as float32 blocks.

    Blocks of an in-RAM float32 array without ``index`` are views (no copy); anything else is read
    one block at a time, so a memmap never has to fit in memory.
    """

    def __init__(self, data: np.ndarray, index: np.ndarray | None = None):
        if data.ndim != 2:
            raise ValueError(f"rows must be an [N, D] array, got shape {data.shape}")
        self.data = data
        self.index = None if index is None else np.asarray(index, np.int64)

    def __len__(self) -> int:
        return len(self.data) if self.index is None else len(self.index)

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    @property
    def in_memory(self) -> bool:
        """False for a memmap: then ``backend=auto`` streams it with torch instead of loading it for faiss."""
        return not isinstance(self.data, np.memmap)

    def subset(self, pos: np.ndarray) -> "Rows":
        """The rows at sorted positions ``pos`` of this view (nothing is read yet)."""
        pos = np.asarray(pos, np.int64)
        return Rows(self.data, pos if self.index is None else self.index[pos])

    def take(self, pos: np.ndarray) -> np.ndarray:
        """float32 ``[len(pos), D]``: the rows at positions ``pos`` (any order), read in ascending order."""
        pos = np.asarray(pos, np.int64)
        rows = pos if self.index is None else self.index[pos]
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), self.dim), np.float32)
        out[order] = self.data[rows[order]]
        return out

    def block(self, start: int, stop: int) -> np.ndarray:
        """float32 rows [start, stop) of this view (a view of an in-RAM float32 array, else a copy)."""
        if self.index is None:
            b = _float32(self.data[start:stop])
            return b if b.flags.writeable and b.flags.c_contiguous else np.array(b)
        return _float32(self.data[self.index[start:stop]])

    def blocks(self, chunk: int = CHUNK):
        """(start, float32 block) over the rows, ``chunk`` at a time."""
        for start in range(0, len(self), chunk):
            yield start, self.block(start, start + chunk)

    def array(self) -> np.ndarray:
        """Every row as one contiguous float32 array in RAM (what faiss needs)."""
        if self.index is None:
            return np.ascontiguousarray(self.data, dtype=np.float32)
        return self.block(0, len(self))


def _float32(a: np.ndarray) -> np.ndarray:
    """float32 values of ``a``; float16 is widened by torch (vectorised, several times numpy's speed),
    exactly as numpy would."""
    if a.dtype == np.float16:
        with warnings.catch_warnings():  # a read-only memmap slice: torch only reads it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.asarray(a)).float().numpy()
    return np.asarray(a, dtype=np.float32)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """A sorted, seeded sample of ``size`` distinct row indices out of ``n`` (all of them when
    ``size >= n``); sorted, so that memmap reads stay sequential."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def kmeans(x: np.ndarray | Rows, k: int, *, niter: int, seed: int, spherical: bool = False, init: str = "random",
           backend: str = "auto", device: str = "auto", chunk: int = CHUNK) -> np.ndarray:
    """k centroids of the rows of ``x`` (this rank's part of them when torch.distributed is initialised).

    Args:
        x: ``[n, d]`` points (cast to float32): an array, or ``Rows`` (e.g. of a memmap), which
            the torch backend and k-means++ read ``chunk`` rows at a time.
        k: clusters, 1 <= k <= the points over all ranks.
        niter: Lloyd iterations.
        seed: seeds the initial centroids (faiss's own random pick, or the torch backend's
            ``sample_indices``, or k-means++); the same seed and points give the same centroids.
        spherical: cluster by cosine: unit points and unit centroids (SemDeDup, Vo et al.);
            otherwise by squared euclidean distance.
        init: ``"random"``: k distinct points; ``"kmeans++"`` (greedy, one process only, and
            O(k n log k) on top of Lloyd, so meant for small k, e.g. a hierarchy's upper levels).
        backend: ``"faiss"`` (one process; reads ``Rows`` into RAM), ``"torch"`` (Lloyd; the only
            one for several ranks) or ``"auto"``: torch when distributed or when ``x`` is
            memmap-backed ``Rows``, else faiss.
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"``: where torch Lloyd runs, and whether faiss may
            use its GPU (faiss-gpu installed); see ``seit.utils.knn.torch_device``.
        chunk: rows per streamed block (torch backend, k-means++).

    Returns:
        float32 ``[k, d]`` centroids, unit rows when ``spherical``.

    Raises:
        ValueError: an unknown backend, init or device, kmeans++ or faiss with several ranks, or k
            outside [1, number of points].
    """
    if backend not in BACKENDS:
        raise ValueError(f"k-means backend must be one of {BACKENDS}, got {backend!r}")
    if init not in INITS:
        raise ValueError(f"k-means init must be one of {INITS}, got {init!r}")
    if init == "kmeans++" and _distributed():
        raise ValueError("k-means++ init runs in one process; with several ranks use init=random")
    rows = x if isinstance(x, Rows) else Rows(x)
    if backend == "auto":
        backend = "torch" if _distributed() or not rows.in_memory else "faiss"
    if backend == "faiss" and _distributed():
        raise ValueError("k-means backend faiss runs in one process; with several ranks use torch")
    total = int(_all_sum(torch.tensor([len(rows)], dtype=torch.float64))[0])
    if not 1 <= k <= total:
        raise ValueError(f"k-means with k={k} needs 1 <= k <= the {total} training points")
    if backend == "faiss":
        x = rows.array()
        start = kmeans_pp(x, k, seed, spherical, chunk) if init == "kmeans++" else None
        return _faiss_kmeans(x, k, niter, seed, spherical, start, device)
    start = kmeans_pp(rows, k, seed, spherical, chunk) if init == "kmeans++" else None
    return _torch_kmeans(rows, k, niter, seed, spherical, start, chunk, device)


def kmeans_pp(x: np.ndarray | Rows, k: int, seed: int, spherical: bool = False, chunk: int = CHUNK) -> np.ndarray:
    """k initial centres ``[k, d]`` float32, picked from the rows of ``x`` by greedy k-means++
    (as scikit-learn): the first uniformly, then each the best of 2 + ln k candidates drawn with
    probability proportional to the squared distance to the nearest centre (2 - 2 cos when
    ``spherical``, where the rows are normalised first), the best lowering the total potential most.

    ``x`` (an array or ``Rows``) is read ``chunk`` rows at a time, once per centre: memory is the
    float64 distances, n x (2 + ln k), not the rows.
    """
    rng = np.random.default_rng(seed)
    rows = x if isinstance(x, Rows) else Rows(x)
    n = len(rows)

    def points(pos) -> torch.Tensor:
        c = torch.from_numpy(rows.take(np.atleast_1d(pos)))
        return F.normalize(c, dim=1) if spherical else c

    def sq_dist(c: torch.Tensor) -> torch.Tensor:  # c: [d] or [m, d] -> [n] or [n, m], float64
        out = torch.empty((n, *c.shape[:-1]), dtype=torch.float64)
        c2 = (c * c).sum(-1)
        for start, b in rows.blocks(chunk):
            b = torch.from_numpy(b)
            if spherical:
                b = F.normalize(b, dim=1)
            dot = b @ (c.T if c.ndim == 2 else c)
            if spherical:
                d2 = 2 - 2 * dot
            else:
                b2 = (b * b).sum(1)
                d2 = b2[:, None] + c2 - 2 * dot if c.ndim == 2 else b2 + c2 - 2 * dot
            out[start:start + len(b)] = d2.clamp_min(0).double()
        return out

    trials = 2 + int(np.log(k))
    centres = [int(rng.integers(n))]
    d2 = sq_dist(points(centres[0])[0])
    for _ in range(1, k):
        p = (d2 / d2.sum()).numpy() if d2.sum() > 0 else None
        cand = rng.choice(n, trials, p=p)
        new = torch.minimum(d2[:, None], sq_dist(points(cand)))  # [n, trials]
        best = int(new.sum(0).argmin())
        centres.append(int(cand[best]))
        d2 = new[:, best]
    return points(np.array(centres)).numpy()


def _faiss_kmeans(x: np.ndarray, k: int, niter: int, seed: int, spherical: bool,
                  start: np.ndarray | None, device: str = "auto") -> np.ndarray:
    faiss = faiss_module()
    # max_points_per_centroid: all of x, no subsampling by faiss (the callers sample)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=spherical, gpu=faiss_gpus(device) > 0,
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


def _torch_kmeans(rows: Rows, k: int, niter: int, seed: int, spherical: bool, start: np.ndarray | None,
                  chunk: int = CHUNK, device: str = "auto") -> np.ndarray:
    dev = torch_device(device)
    if start is not None:
        return _lloyd(rows, torch.from_numpy(start).to(dev), niter, spherical, chunk)
    # init: k distinct points drawn over all ranks' rows with one seed, gathered by a sum
    counts = [len(rows)]
    if _distributed():
        counts = [0] * dist.get_world_size()
        dist.all_gather_object(counts, len(rows))
    offset = sum(counts[: dist.get_rank()]) if _distributed() else 0
    pick = sample_indices(sum(counts), k, seed)
    here = (pick >= offset) & (pick < offset + len(rows))
    mine = torch.from_numpy(rows.take(pick[here] - offset))
    init = torch.zeros(k, rows.dim, dtype=torch.float64)
    init[torch.from_numpy(np.flatnonzero(here))] = (F.normalize(mine, dim=1) if spherical else mine).double()
    return _lloyd(rows, _all_sum(init).float().to(dev), niter, spherical, chunk)


def _lloyd(rows: Rows, centroids: torch.Tensor, niter: int, spherical: bool, chunk: int) -> np.ndarray:
    """Lloyd iterations over ``rows`` read a block at a time; sums and counts in float64, all-reduced over ranks."""
    dev, k = centroids.device, len(centroids)
    metric = "ip" if spherical else "l2"
    for _ in range(niter):
        sums = torch.zeros(k, rows.dim, dtype=torch.float64, device=dev)
        sizes = torch.zeros(k, dtype=torch.float64, device=dev)
        for _, b in rows.blocks(chunk):
            block = torch.from_numpy(b).to(dev)
            if spherical:
                block = F.normalize(block, dim=1)
            label = nearest_code(block, centroids, metric=metric)
            sums.index_add_(0, label, block.double())
            sizes.index_add_(0, label, torch.ones_like(label, dtype=torch.float64))
        sums, sizes = _all_sum(sums.cpu()), _all_sum(sizes.cpu())
        new = F.normalize(sums, dim=1) if spherical else sums / sizes.clamp_min(1)[:, None]
        centroids = torch.where((sizes > 0)[:, None].to(dev), new.float().to(dev), centroids)
    return centroids.cpu().numpy()


def _unit(c: np.ndarray) -> np.ndarray:
    return (c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)).astype(np.float32)
