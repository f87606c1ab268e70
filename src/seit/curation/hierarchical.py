"""Hierarchical k-means with resampling and balanced hierarchical sampling (Vo et al. 2024).

Flat k-means on web-scale data spends most centroids on the dense modes, so sampling "per
cluster" still over-represents them. Vo et al. cluster the centroids again, level by level, and
at each level re-fit k-means on the points nearest each centroid (resampling), which moves the
centroids towards a uniform cover of the support. Sampling top-down with an equal cap per
cluster then yields a subset balanced over concepts rather than over raw frequency.

Everything is spherical: inputs and centroids are unit vectors and "closest" means highest cosine.

Level 1 may read a memmap (the float16 embeddings store): its k-means, resampling and assignment
then stream the rows a block at a time (torch Lloyd, ``seit.utils.kmeans.Rows``), so memory is a
block plus the centroids and the level's O(N) labels, never the N x d float32 matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seit.curation.kmeans import assign_chunk
from seit.utils.kmeans import CHUNK, Rows, kmeans

STRATEGIES = ("random", "closest")


@dataclass
class Hierarchy:
    """The cluster tree; every node is non-empty.

    ``levels[t][j]`` holds the members of cluster j of level t as indices into that level's
    inputs (original points for t=0, level t-1 cluster ids above), closest to the centroid first.
    """

    levels: list[list[np.ndarray]]
    centroids: list[np.ndarray]  # per level, [k_t', d] unit float32

    def flat_sizes(self, level: int) -> np.ndarray:
        """Number of original points under each cluster of ``level`` (what sampling balances)."""
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level must be in [0, {len(self.levels)}), got {level}")
        sizes = np.array([len(m) for m in self.levels[0]], dtype=np.int64)
        for t in range(1, level + 1):
            sizes = np.array([sizes[m].sum() for m in self.levels[t]], dtype=np.int64)
        return sizes


def _nearest(x: Rows, centroids: np.ndarray, device: str, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row's nearest centroid and its cosine, the rows read ``chunk`` at a time."""
    label, sim = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
    for start, block in x.blocks(chunk):
        lab, s = assign_chunk(block, centroids, device=device)
        label[start:start + len(block)], sim[start:start + len(block)] = lab[:, 0], s[:, 0]
    return label, sim


def _groups(label: np.ndarray, sim: np.ndarray, k: int) -> list[np.ndarray]:
    """Members per cluster, highest cosine first (ties by index, so the order is deterministic)."""
    order = np.lexsort((np.arange(len(label)), -sim.astype(np.float64), label))
    bounds = np.cumsum(np.bincount(label, minlength=k))[:-1]
    return np.split(order.astype(np.int64), bounds)


def _seed(seed: int, level: int, step: int) -> int:
    """A distinct, reproducible seed per (level, step): each re-fit is a fresh k-means."""
    return int(np.random.SeedSequence([seed, level, step]).generate_state(1)[0] >> 1)


def _cluster_level(x: Rows, k, r, steps, niter, seed, level, backend, init, device, chunk):
    """Algorithm 1 for one level: k-means, then ``steps`` times re-fit on the r closest per cluster."""
    fit = dict(niter=niter, spherical=True, init=init, backend=backend, device=device, chunk=chunk)
    centroids = kmeans(x, k, seed=_seed(seed, level, 0), **fit)
    label, sim = _nearest(x, centroids, device, chunk)
    for step in range(1, steps + 1):
        groups = _groups(label, sim, len(centroids))
        pick = np.sort(np.concatenate([g[:r] for g in groups]))
        centroids = kmeans(x.subset(pick), min(k, len(pick)), seed=_seed(seed, level, step), **fit)
        label, sim = _nearest(x, centroids, device, chunk)  # re-assign all of the level's inputs, not just R
    groups = _groups(label, sim, len(centroids))
    keep = [j for j, g in enumerate(groups) if len(g)]  # drop empty clusters: every node non-empty
    return [groups[j] for j in keep], centroids[keep]


def _per_level(value, n_levels: int, name: str) -> list:
    if isinstance(value, list):
        if len(value) != n_levels:
            raise ValueError(f"{name} needs one entry per level ({n_levels}), got {len(value)}")
        return value
    return [value] * n_levels


def hierarchical_kmeans(x: np.ndarray | Rows, ks: list[int], resampling_steps: list[int] | int = 10,
                        sample_sizes: list[int | None] | None = None, niter: int = 20, seed: int = 0,
                        backend: str = "auto", init: str = "kmeans++", device: str = "auto",
                        chunk: int = CHUNK) -> Hierarchy:
    """Build the tree bottom-up: level t clusters level t-1's centroids into ``ks[t]`` clusters.

    ``x``: the ``[N, d]`` unit points: an in-RAM array, or a memmap (e.g. ``Embeddings.vectors``,
    float16) or ``Rows``, which level 1 streams ``chunk`` rows at a time; with ``backend="auto"``
    a memmap is clustered by torch Lloyd on ``device`` (faiss would need it in RAM), an in-RAM
    array by faiss. ``sample_sizes[t]`` is r_t, the members per cluster kept for each re-fit (None:
    half the mean cluster size). A level above the first gets at most as many clusters as it has
    inputs, since empty clusters below may have been dropped. ``init``: k-means++ (the paper; it
    keeps a small group from being merged at a coarse level; on a memmap it reads the rows once per
    centroid) or random (cheaper on a huge first level).

    Raises ValueError for a malformed x, ks, resampling_steps or sample_sizes.
    """
    rows = x if isinstance(x, Rows) else Rows(x) if isinstance(x, np.memmap) else None
    shape = (len(rows), rows.dim) if rows is not None else np.shape(x)
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"x must be a non-empty [N, d] array, got shape {shape}")
    ks = list(ks)
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive cluster counts, got {ks}")
    if any(b > a for a, b in zip(ks, ks[1:])):
        raise ValueError(f"ks must be non-increasing (each level clusters the one below), got {ks}")
    if ks[0] > shape[0]:
        raise ValueError(f"ks[0]={ks[0]} exceeds the {shape[0]} points")
    steps = _per_level(resampling_steps, len(ks), "resampling_steps")
    if any(int(s) < 0 for s in steps):
        raise ValueError(f"resampling_steps must be >= 0, got {resampling_steps}")
    sizes = _per_level(sample_sizes, len(ks), "sample_sizes")
    if any(r is not None and int(r) < 1 for r in sizes):
        raise ValueError(f"sample_sizes must be None or >= 1, got {sample_sizes}")

    levels, centroids = [], []
    inputs = rows if rows is not None else Rows(np.ascontiguousarray(x, dtype=np.float32))
    for t, (k, m, r) in enumerate(zip(ks, steps, sizes)):
        k = min(int(k), len(inputs))
        r = max(1, round(0.5 * len(inputs) / k)) if r is None else int(r)
        groups, c = _cluster_level(inputs, k, r, int(m), niter, seed, t, backend, init, device, chunk)
        levels.append(groups)
        centroids.append(c)
        inputs = Rows(c)  # the next level clusters this level's centroids
    return Hierarchy(levels, centroids)


def find_subcluster_target_size(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``target`` over children of the given sizes with one equal cap: small children whole.

    The cap c is the largest with sum(min(c, a_i)) <= target; the remainder goes +1 to randomly
    chosen children larger than c, so the total is exactly min(target, sum(sizes)).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if target < 0 or (sizes < 0).any():
        raise ValueError("target and sizes must be non-negative")
    if sizes.sum() <= target:
        return sizes.copy()
    lo, hi = 0, int(sizes.max())  # sum(min(lo, a)) <= target < sum(min(hi, a))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(sizes, mid).sum() <= target:
            lo = mid
        else:
            hi = mid
    out = np.minimum(sizes, lo)
    over = np.flatnonzero(sizes > lo)  # raising the cap to lo+1 would add |over| > remainder
    out[rng.choice(over, int(target - out.sum()), replace=False)] += 1
    return out


def balanced_sample(h: Hierarchy, target: int, seed: int = 0, strategy: str = "random") -> np.ndarray:
    """Sorted original indices, exactly min(target, N) of them, balanced top-down over the tree.

    Each cluster's quota is split over its children by ``find_subcluster_target_size`` on their
    flat sizes; a level-1 cluster (level 0 here) gives its quota as random members ("random") or
    as the members closest to its centroid ("closest").
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    rng = np.random.default_rng(seed)
    flat = [h.flat_sizes(t) for t in range(len(h.levels))]
    picked: list[np.ndarray] = []

    def allocate(level: int, ids: np.ndarray, quota: int) -> None:
        shares = find_subcluster_target_size(flat[level][ids], quota, rng)
        for j, share in zip(ids, shares):
            if share == 0:
                continue
            if level > 0:
                allocate(level - 1, h.levels[level][j], int(share))
            elif strategy == "closest":
                picked.append(h.levels[0][j][:share])
            else:
                picked.append(rng.choice(h.levels[0][j], int(share), replace=False))

    top = len(h.levels) - 1
    allocate(top, np.arange(len(h.levels[top])), min(int(target), int(flat[top].sum())))
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)
