"""SemDeDup (Abbas et al. 2023): inside each k-means cluster, drop near-duplicates (cos > 1 - eps).

Semantics, chosen deliberately (checklist item 5): as in the official code, point j is removed iff
some **earlier** member of its cluster, removed or not, has cosine > 1 - eps with it; "earlier" is
the canonical order (farthest from the centroid first), so in every duplicate group the least
prototypical member survives. Then the kept set is ``M_j <= 1 - eps`` for one per-point number
``M_j = max_{i<j} cos(x_i, x_j)``: every eps is answered from the same pass, the kept fraction is
monotone in eps, and calibrating eps to a target kept fraction is an exact quantile instead of the
paper's interpolation between two trial runs. A chain A~B~C with A, C apart loses both B and C.

Scale: the in-cluster similarity runs on ``curate.device`` (torch on cuda when there is a GPU).
Under torchrun/srun (torch.distributed initialised, world > 1) the clusters are split over the
ranks, balanced by their cost (size squared, longest first onto the least loaded rank); each rank
scores its own and rank 0 merges them, with the same result as one rank: per point the largest M,
ties to the lowest cluster index, exactly the order one rank visits them in.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from seit.curation.kmeans import Clusters, assign_chunk
from seit.utils.knn import torch_device


def read_rows(vectors: np.ndarray, index: np.ndarray) -> np.ndarray:
    """float32 rows of a memmap in the given order, read in ascending index order."""
    by_pos = np.argsort(index, kind="stable")
    rows = np.empty((len(index), vectors.shape[1]), np.float32)
    rows[by_pos] = vectors[index[by_pos]]
    return rows


def max_earlier_similarity(e: np.ndarray, block: int = 4096, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(M_j = max_{i<j} <e_i, e_j> float32 [n], the argmax i int64 [n]) for rows ``e`` [n, d] in
    order (-inf, -1 for the first); O(n^2) in row blocks of ``block`` x n, on
    ``torch_device(device)`` (cuda when torch sees a GPU, unless ``device="cpu"``)."""
    dev = torch_device(device)
    x = torch.from_numpy(np.ascontiguousarray(e, dtype=np.float32)).to(dev)
    out = np.full(len(x), -np.inf, np.float32)
    arg = np.full(len(x), -1, np.int64)
    for s in range(0, len(x), block):
        rows = x[s:s + block]
        sims = rows @ x[:s + len(rows)].T  # [b, s+b]
        later = torch.arange(s + len(rows), device=dev)[None, :] >= torch.arange(s, s + len(rows), device=dev)[:, None]
        sims.masked_fill_(later, -torch.inf)
        best = sims.max(1)
        out[s:s + len(rows)], arg[s:s + len(rows)] = best.values.cpu().numpy(), best.indices.cpu().numpy()
    arg[0:1] = -1
    return out, arg


def cluster_owners(costs: np.ndarray, world: int) -> np.ndarray:
    """int64 [k]: the rank that scores each cluster. Longest-processing-time first: clusters by
    descending cost (ties by index) each go to the least loaded rank (ties to the lowest rank), so
    the split is deterministic, the same on every rank, and within 4/3 of the best makespan."""
    costs = np.asarray(costs, np.float64)
    owner = np.empty(len(costs), np.int64)
    load = np.zeros(max(1, int(world)))
    for j in np.lexsort((np.arange(len(costs)), -costs)):
        r = int(np.argmin(load))
        owner[j] = r
        load[r] += costs[j]
    return owner


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _cluster_lists(store, clusters: Clusters, probes: int, chunk: int, device: str) -> list[np.ndarray]:
    """Every cluster's members in the global "earlier" order; with probes > 1, also the points for
    which it is a next-nearest cluster."""
    lists = [clusters.members(j) for j in range(clusters.k)]
    if probes <= 1:
        return lists
    n = len(clusters.label)
    rank = np.empty(n, np.int64)
    rank[np.lexsort((np.arange(n), clusters.sim))] = np.arange(n)
    extra = [[] for _ in range(clusters.k)]
    for start, x in store.chunks(chunk):
        labels = assign_chunk(x, clusters.centroids, top=min(probes, clusters.k), device=device)[0][:, 1:]
        for col in labels.T:
            order = np.argsort(col, kind="stable")
            cuts = np.searchsorted(col[order], np.arange(clusters.k + 1))
            for j in range(clusters.k):
                extra[j].append(start + order[cuts[j]:cuts[j + 1]])
    lists = [np.concatenate([lists[j], *extra[j]]) for j in range(clusters.k)]
    return [members[np.argsort(rank[members], kind="stable")] for members in lists]


def merge_scores(n: int, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(M float32 [n], partner int64 [n]) from per-rank parts (points int64, M, partner, cluster
    that gave it): per point the largest M, ties to the lowest cluster, as one rank finds it."""
    m = np.full(n, -np.inf, np.float32)
    partner = np.full(n, -1, np.int64)
    source = np.full(n, np.iinfo(np.int64).max, np.int64)
    for idx, mv, pv, sv in parts:
        better = (mv > m[idx]) | ((mv == m[idx]) & (sv < source[idx]))
        m[idx[better]], partner[idx[better]], source[idx[better]] = mv[better], pv[better], sv[better]
    return m, partner


def semdedup_scores(store, clusters: Clusters, block: int = 4096, probes: int = 1, progress=None,
                    chunk: int = 1 << 16, alive: np.ndarray | None = None,
                    device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(M float32 [N], the earlier point it duplicates most: a store index, int64 [N], -1 for none).

    ``alive`` (bool [N]): only these points are compared, with each other (an earlier curation step,
    ``curate.start_from``, removed the rest: a removed copy must not remove its kept original too);
    the others get M = -inf.

    ``probes > 1`` also compares each point inside its next-nearest clusters: a duplicate pair
    split by a cluster boundary is then still found (cost grows about probes^2). "Earlier" is
    one global order (ascending similarity to the own centroid, then index), so two points never
    remove each other, and with one probe it is exactly each cluster's canonical order.

    ``device``: where the in-cluster similarity runs (``torch_device``). With torch.distributed
    initialised and world > 1, every rank must call this: each scores the clusters
    ``cluster_owners`` gives it and rank 0 gathers and merges them (``merge_scores``): rank 0
    returns the full result, equal to one rank's; the other ranks return only their own part
    (-inf / -1 elsewhere).
    """
    n = len(clusters.label)
    rank, world = _distributed()
    lists = _cluster_lists(store, clusters, probes, chunk, device)
    owner = cluster_owners(np.array([float(len(v)) ** 2 for v in lists]), world)
    m = np.full(n, -np.inf, np.float32)
    partner = np.full(n, -1, np.int64)
    source = np.full(n, -1, np.int64)
    for j, members in enumerate(lists):
        if owner[j] != rank:
            continue
        count = len(members)
        if alive is not None:
            members = members[alive[members]]
        if len(members) > 1:
            mj, arg = max_earlier_similarity(read_rows(store.vectors, members), block, device)
            better = mj > m[members]
            m[members[better]] = mj[better]
            partner[members[better]] = members[arg[better]]
            source[members[better]] = j
        if progress is not None:
            progress(count)
    if world == 1:
        return m, partner
    touched = np.flatnonzero(source >= 0)
    mine = (touched, m[touched], partner[touched], source[touched])
    parts = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if rank != 0:
        return m, partner
    return merge_scores(n, parts)


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
