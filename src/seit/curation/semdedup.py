"""SemDeDup (Abbas et al. 2023): inside each k-means cluster, drop near-duplicates (cos > 1 - eps).

Semantics, chosen deliberately (checklist item 5): as in the official code, point j is removed iff
some **earlier** member of its cluster, removed or not, has cosine > 1 - eps with it; "earlier" is
the canonical order (farthest from the centroid first), so in every duplicate group the least
prototypical member survives. Then the kept set is ``M_j <= 1 - eps`` for one per-point number
``M_j = max_{i<j} cos(x_i, x_j)``: every eps is answered from the same pass, the kept fraction is
monotone in eps, and calibrating eps to a target kept fraction is an exact quantile instead of the
paper's interpolation between two trial runs. A chain A~B~C with A, C apart loses both B and C.
"""

from __future__ import annotations

import numpy as np
import torch

from seit.curation.kmeans import Clusters, assign_chunk


def read_rows(vectors: np.ndarray, index: np.ndarray) -> np.ndarray:
    """float32 rows of a memmap in the given order, read in ascending index order."""
    by_pos = np.argsort(index, kind="stable")
    rows = np.empty((len(index), vectors.shape[1]), np.float32)
    rows[by_pos] = vectors[index[by_pos]]
    return rows


def max_earlier_similarity(e: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(M_j = max_{i<j} <e_i, e_j>, the argmax i) for rows in order (-inf, -1 for the first);
    O(n^2) in row blocks of ``block`` x n."""
    x = torch.from_numpy(np.ascontiguousarray(e, dtype=np.float32))
    out = np.full(len(x), -np.inf, np.float32)
    arg = np.full(len(x), -1, np.int64)
    for s in range(0, len(x), block):
        rows = x[s:s + block]
        sims = rows @ x[:s + len(rows)].T  # [b, s+b]
        later = torch.arange(s + len(rows))[None, :] >= torch.arange(s, s + len(rows))[:, None]
        sims.masked_fill_(later, -torch.inf)
        best = sims.max(1)
        out[s:s + len(rows)], arg[s:s + len(rows)] = best.values.numpy(), best.indices.numpy()
    arg[0:1] = -1
    return out, arg


def semdedup_scores(store, clusters: Clusters, block: int = 4096, probes: int = 1, progress=None,
                    chunk: int = 1 << 16, alive: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(M, the earlier point it duplicates most: a store index, -1 for none) for every point.

    ``alive`` (bool [N]): only these points are compared, with each other (an earlier curation step,
    ``curate.start_from``, removed the rest: a removed copy must not remove its kept original too);
    the others get M = -inf.

    ``probes > 1`` also compares each point inside its next-nearest clusters: a duplicate pair
    split by a cluster boundary is then still found (cost grows about probes^2). "Earlier" is
    one global order (ascending similarity to the own centroid, then index), so two points never
    remove each other, and with one probe it is exactly each cluster's canonical order.
    """
    n = len(clusters.label)
    m = np.full(n, -np.inf, np.float32)
    partner = np.full(n, -1, np.int64)
    rank = np.empty(n, np.int64)
    rank[np.lexsort((np.arange(n), clusters.sim))] = np.arange(n)
    lists = [clusters.members(j) for j in range(clusters.k)]
    if probes > 1:
        extra = [[] for _ in range(clusters.k)]
        for start, x in store.chunks(chunk):
            labels = assign_chunk(x, clusters.centroids, top=min(probes, clusters.k))[0][:, 1:]
            for col in labels.T:
                order = np.argsort(col, kind="stable")
                cuts = np.searchsorted(col[order], np.arange(clusters.k + 1))
                for j in range(clusters.k):
                    extra[j].append(start + order[cuts[j]:cuts[j + 1]])
        lists = [np.concatenate([lists[j], *extra[j]]) for j in range(clusters.k)]
        lists = [members[np.argsort(rank[members], kind="stable")] for members in lists]
    for members in lists:
        count = len(members)
        if alive is not None:
            members = members[alive[members]]
        if len(members) > 1:
            mj, arg = max_earlier_similarity(read_rows(store.vectors, members), block)
            better = mj > m[members]
            m[members[better]] = mj[better]
            partner[members[better]] = members[arg[better]]
        if progress is not None:
            progress(count)
    return m, partner


def keep_mask(m: np.ndarray, eps: float) -> np.ndarray:
    """Kept = M <= 1 - eps, compared at M's own float32 precision so a calibrated eps is exact."""
    return m <= np.float32(1.0 - eps)


def calibrate_eps(m: np.ndarray, target_kept: float) -> float:
    """The largest eps that still keeps at least ``target_kept`` of the points: the kept fraction
    falls as eps grows, so this removes as much as the target allows (ties at the threshold stay)."""
    if not 0 < target_kept <= 1:
        raise ValueError(f"curate.target_kept must be in (0, 1], got {target_kept}")
    need = int(np.ceil(target_kept * len(m)))
    finite = np.sort(m[np.isfinite(m)])  # ascending: the first ones are the last to go
    keep_finite = need - (len(m) - len(finite))  # points with no earlier neighbour are always kept
    if keep_finite >= len(finite):
        return 0.0
    t = finite[keep_finite - 1] if keep_finite > 0 else np.nextafter(finite[0], np.float32(-np.inf))
    return float(1.0 - np.float64(t))
