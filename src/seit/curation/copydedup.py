"""Copy-detection dedup as DINOv2 does it (Oquab et al. 2023, Appendix A.3).

Self-dedup: the k nearest neighbours of every point (k=64) under cosine, edges with sim > 0.6, the
connected components of that graph; each component keeps one representative. Relative dedup: the
same graph over pool + reference rows (the evaluation splits) at the stricter sim > 0.45; every
pool point whose component holds a reference row is dropped, so no copy of an evaluation image,
nor a chain of copies leading to one, stays in the training pool.

Choices (the paper leaves them open):
- The representative of a component is its lowest dataset index: deterministic, independent of
  the k-NN tie order and of faiss's thread count, the same in every rerun.
- Relative dedup runs first, on every pool point; self-dedup then runs on its survivors. The other
  order would let self-dedup drop the copy that links a kept point to an evaluation image.
- "sim > t" is strict, compared in float32: a pair exactly at the threshold is no edge.
- The k-NN search is exact (faiss IndexFlatIP on L2-normalised float32 rows), queried in chunks of
  rows: memory is the index (N x D float32) plus chunk x (k + 1) results, so 1M 64-d rows fit in
  well under 1 GB. DINOv2 used a disjoint-set union over the edges; scipy's connected_components
  on the sparse graph gives the same components.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from seit.utils.knn import flat_ip_index


@dataclass
class Graph:
    """The thresholded k-NN graph of N rows: undirected edges (i < j) with their cosine, and components."""

    edges: np.ndarray   # int64 [E, 2], i < j, each edge once
    sims: np.ndarray    # float32 [E]
    label: np.ndarray   # int64 [N], component of each row
    nearest: np.ndarray  # float32 [N], cosine to the nearest other row (-inf when N == 1)

    @property
    def num_components(self) -> int:
        return int(self.label.max()) + 1 if self.label.size else 0


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_graph(x: np.ndarray, k: int, threshold: float, chunk: int = 4096, device: str = "auto") -> Graph:
    """x float [N, D] (re-normalised here: cosine = inner product) -> the graph of edges i~j where j is
    among the k nearest other rows of i (or i of j) and cos(i, j) > threshold. k is capped at N - 1.
    ``device``: the exact search runs on faiss's GPU index when faiss-gpu is installed and
    ``device`` is auto or cuda (``seit.utils.knn.flat_ip_index``), else on the CPU.

    Raises ValueError for k < 1 or a threshold outside [-1, 1].
    """

    if k < 1:
        raise ValueError(f"curate.k must be >= 1, got {k}")
    if not -1 <= threshold <= 1:
        raise ValueError(f"a cosine threshold must lie in [-1, 1], got {threshold}")
    x = _normalised(x)
    n = len(x)
    k = min(k, n - 1)
    nearest = np.full(n, -np.inf, np.float32)
    if k < 1:
        return Graph(np.zeros((0, 2), np.int64), np.zeros(0, np.float32), np.arange(n, dtype=np.int64), nearest)
    index = flat_ip_index(x.shape[1], device, k=k + 1)
    index.add(x)
    t = np.float32(threshold)
    rows, cols, sims = [], [], []
    for start in range(0, n, chunk):
        d, i = index.search(x[start:start + chunk], k + 1)
        query = np.arange(start, start + len(d))[:, None]
        other = (i != query) & (i >= 0)
        other &= np.cumsum(other, axis=1) <= k  # self is usually first, but ties may put it anywhere
        nearest[start:start + len(d)] = np.where(other, d, -np.inf).max(1)
        keep = other & (d > t)
        rows.append(np.broadcast_to(query, i.shape)[keep])
        cols.append(i[keep])
        sims.append(d[keep])
    a, b, s = np.concatenate(rows), np.concatenate(cols), np.concatenate(sims).astype(np.float32)
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], 1)
    pairs, first = np.unique(pairs, axis=0, return_index=True)  # i in j's list and j in i's: one edge
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    return Graph(pairs.astype(np.int64), s[first], label.astype(np.int64), nearest)


def first_of_component(label: np.ndarray) -> np.ndarray:
    """int64 [C]: the lowest row index in each component, by component label."""
    first = np.full(int(label.max()) + 1 if label.size else 0, len(label), np.int64)
    np.minimum.at(first, label, np.arange(len(label)))
    return first


def self_dedup(x: np.ndarray, k: int = 64, threshold: float = 0.6, chunk: int = 4096,
               device: str = "auto") -> tuple[np.ndarray, Graph]:
    """(kept row indices into x, ascending: one per component, its lowest index; the graph)."""
    graph = knn_graph(x, k, threshold, chunk, device)
    return np.sort(first_of_component(graph.label)), graph


def relative_dedup(pool: np.ndarray, reference: np.ndarray, k: int = 64, threshold: float = 0.45,
                   chunk: int = 4096, device: str = "auto") -> tuple[np.ndarray, Graph]:
    """(bool [len(pool)]: pool rows in no component with a reference row; the joint graph, pool rows
    first). pool float [N, D], reference float [R, D], both in the same embedding space."""
    if pool.shape[1] != reference.shape[1]:
        raise ValueError(f"pool rows are {pool.shape[1]}-d, reference rows {reference.shape[1]}-d")
    graph = knn_graph(np.concatenate([pool, reference]).astype(np.float32, copy=False), k, threshold, chunk, device)
    tainted = np.zeros(graph.num_components, bool)
    tainted[graph.label[len(pool):]] = True
    return ~tainted[graph.label[:len(pool)]], graph


def copydedup(pool: np.ndarray, reference: np.ndarray | None = None, *, k: int = 64, threshold: float = 0.6,
              relative_threshold: float = 0.45, chunk: int = 4096, device: str = "auto") -> tuple[np.ndarray, dict]:
    """Relative dedup against ``reference`` (when given), then self-dedup of the survivors.

    pool float [N, D], reference float [R, D] or None: rows in one embedding space (cosine).
    Returns (kept indices into pool, ascending; stats with "removed_relative", "removed_self",
    "components", "largest_component", "edges", "partner" (int64 [N]: the representative that
    replaced each self-removed row, else -1), "nearest" (float32 [N]: cosine to the nearest other
    survivor of relative dedup, -inf for the rest)).
    """
    n = len(pool)
    stats: dict = {"k": int(k), "threshold": float(threshold), "num_pool": int(n)}
    survivors = np.arange(n)
    if reference is not None and len(reference):
        clean, joint = relative_dedup(pool, reference, k, relative_threshold, chunk, device)
        survivors = np.flatnonzero(clean)
        ref_components = np.unique(joint.label[n:])
        stats.update(relative_threshold=float(relative_threshold), num_reference=int(len(reference)),
                     removed_relative=int(n - len(survivors)), relative_edges=int(len(joint.edges)),
                     reference_components_with_pool=int(np.isin(ref_components, joint.label[:n]).sum()))
    partner = np.full(n, -1, np.int64)
    nearest = np.full(n, -np.inf, np.float32)
    kept = survivors
    if len(survivors):
        local, graph = self_dedup(np.asarray(pool)[survivors], k, threshold, chunk, device)
        kept = survivors[local]
        partner[survivors] = survivors[first_of_component(graph.label)[graph.label]]
        partner[kept] = -1
        nearest[survivors] = graph.nearest
        sizes = np.bincount(graph.label)
        stats.update(components=int(graph.num_components), largest_component=int(sizes.max()),
                     components_with_copies=int((sizes > 1).sum()), edges=int(len(graph.edges)))
    stats.update(removed_self=int(len(survivors) - len(kept)), partner=partner, nearest=nearest)
    return kept, stats
