"""Density-Based Pruning (Abbas, Rusak et al., ICLR 2024): per-cluster budgets from complexity.

d_intra_j = mean (1 - cos) of cluster j's points to its centroid (small = dense), d_inter_j = mean
(1 - cos) to the l nearest other centroids (small = crowded region), complexity C = d_inter *
d_intra, shares P = softmax(C / tau). The keep counts solve min ||x - N P||^2 s.t. sum x = N,
lb <= x <= size: the separable QP's KKT solution is x_j = clip(N P_j + lam, lb_j, size_j), with lam
found by bisection (water-filling), then made integer by flooring and handing out the remainder
by largest fractional part, so the total is exactly N (the official np.rint can miss by a few).
Inside a cluster the first x_j of the canonical order are kept: the farthest from the centroid.
"""

from __future__ import annotations

import numpy as np

from seit.curation.kmeans import Clusters


def d_intra(clusters: Clusters, alive: np.ndarray) -> np.ndarray:
    """Mean cosine distance to the centroid over each cluster's surviving points (NaN when empty)."""
    k = clusters.k
    lab = clusters.label[alive]
    total = np.bincount(lab, weights=1.0 - clusters.sim[alive].astype(np.float64), minlength=k)
    count = np.bincount(lab, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def d_inter(centroids: np.ndarray, neighbours: int = 20, block: int = 4096) -> np.ndarray:
    """Mean cosine distance of each centroid to its l nearest other centroids (self excluded),
    in row blocks: k = 1M centroids never builds the k x k matrix."""
    c = (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).astype(np.float64)
    l = min(neighbours, len(c) - 1)
    if l < 1:
        return np.ones(len(c))
    out = np.empty(len(c))
    for s in range(0, len(c), block):
        dist = 1.0 - c[s:s + block] @ c.T
        dist[np.arange(len(dist)), np.arange(s, s + len(dist))] = np.inf
        out[s:s + len(dist)] = np.partition(dist, l - 1, axis=1)[:, :l].mean(1)
    return out


def shares(complexity: np.ndarray, tau: float) -> np.ndarray:
    c = np.where(np.isnan(complexity), np.nanmean(complexity) if np.isfinite(complexity).any() else 0.0, complexity)
    z = c / tau
    z = np.exp(z - z.max())
    return z / z.sum()


def water_fill(target: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: int, iters: int = 200) -> np.ndarray:
    """Integers x with sum exactly ``total``, lower <= x <= upper, nearest to ``target`` in L2."""
    target, lower, upper = (np.asarray(a, np.float64) for a in (target, lower, upper))
    if np.any(lower > upper):
        raise ValueError("water_fill: a lower bound exceeds its upper bound")
    if not lower.sum() <= total <= upper.sum():
        raise ValueError(f"water_fill: the budget {total} is outside [{lower.sum():.0f}, {upper.sum():.0f}] "
                         "(the floors and sizes)")
    lo, hi = (lower - target).min() - 1.0, (upper - target).max() + 1.0
    for _ in range(iters):  # sum(clip(target + lam)) is nondecreasing in lam
        mid = 0.5 * (lo + hi)
        if np.clip(target + mid, lower, upper).sum() < total:
            lo = mid
        else:
            hi = mid
    x = np.clip(target + hi, lower, upper)
    base = np.minimum(np.floor(x + 1e-9), upper)
    left = int(round(total - base.sum()))
    if left > 0:
        frac = np.where(base < upper, x - base, -np.inf)
        base[np.argsort(-frac, kind="stable")[:left]] += 1
    elif left < 0:
        frac = np.where(base > lower, x - base, np.inf)
        base[np.argsort(frac, kind="stable")[:-left]] -= 1
    return base.astype(np.int64)


KEEPS = ("hard", "easy", "random")


def dbp_select(clusters: Clusters, alive: np.ndarray, budget: int, *, tau: float = 0.1, neighbours: int = 20,
               balance: float = 0.0, keep: str = "hard", seed: int = 0) -> tuple[np.ndarray, dict]:
    """Indices kept by DBP among the ``alive`` points (bool [N], e.g. SemDeDup's survivors).

    ``balance``: SSP's class balancing, a floor of ``balance * budget / k`` per cluster (0 = none).
    ``keep``: inside a cluster, the farthest from the centroid (hard, the paper), the closest
    (easy: Sorscher et al. for scarce data) or a random draw (the official code's three options).
    """
    if keep not in KEEPS:
        raise ValueError(f"curate.keep must be one of {KEEPS}, got {keep!r}")
    sizes = np.bincount(clusters.label[alive], minlength=clusters.k)
    if not 0 < budget <= sizes.sum():
        raise ValueError(f"DBP budget {budget} must be in (0, {sizes.sum()}] (the points left after dedup)")
    intra, inter = d_intra(clusters, alive), d_inter(clusters.centroids, neighbours)
    complexity = intra * inter
    p = shares(complexity, tau)
    floor = np.minimum(int(budget / clusters.k * balance), sizes)
    counts = water_fill(budget * p, floor, sizes, budget)
    kept, rng = [], np.random.default_rng(seed)
    for j in range(clusters.k):
        members = clusters.members(j)
        members = members[alive[members]]
        if keep == "easy":
            members = members[::-1]
        elif keep == "random":
            members = rng.permutation(members)
        kept.append(members[: counts[j]])
    stats = {"d_intra": intra, "d_inter": inter, "complexity": complexity, "share": p, "sizes": sizes, "keep": counts}
    return np.sort(np.concatenate(kept)), stats
