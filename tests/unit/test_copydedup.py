"""DINOv2 copy-detection dedup (seit.curation.copydedup): components, thresholds, relative dedup."""

from __future__ import annotations

import numpy as np
import pytest

from seit.curation.copydedup import copydedup, knn_graph, relative_dedup, self_dedup


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def groups_and_singletons(seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """3 groups of near-copies (cos ~0.99 inside) and 6 singletons in 64-d, rows shuffled."""
    rng = np.random.default_rng(seed)
    bases = rng.standard_normal((9, 64))  # random 64-d directions: |cos| ~ 0.13 apart
    rows, owner = [], []
    for g, size in enumerate([4, 3, 2, 1, 1, 1, 1, 1, 1]):
        for _ in range(size):
            rows.append(bases[g] + 0.1 * rng.standard_normal(64))
            owner.append(g)
    order = rng.permutation(len(rows))
    x = unit(np.array(rows)[order])
    owner = np.array(owner)[order]
    return x, [sorted(np.flatnonzero(owner == g).tolist()) for g in range(9)]


def test_components_keep_the_lowest_index_of_each_group():
    x, groups = groups_and_singletons()
    kept, graph = self_dedup(x, k=64, threshold=0.6)
    assert kept.tolist() == sorted(g[0] for g in groups)  # 9 components, each keeps its lowest row
    assert graph.num_components == 9
    assert len(graph.edges) == 6 + 3 + 1  # complete graphs of 4, 3 and 2 rows, each edge once
    assert (graph.sims > 0.6).all() and (graph.edges[:, 0] < graph.edges[:, 1]).all()


def test_chunked_search_gives_the_same_graph():
    x, _ = groups_and_singletons(1)
    a, b = knn_graph(x, 4, 0.6, chunk=3), knn_graph(x, 4, 0.6, chunk=4096)
    assert np.array_equal(a.edges, b.edges) and np.array_equal(a.label, b.label)


def test_a_pair_exactly_at_the_threshold_is_no_edge():
    x = np.array([[1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]], np.float32)  # unit rows, cosine exactly 0.5
    assert len(knn_graph(x, 1, 0.5).edges) == 0 and self_dedup(x, 1, 0.5)[0].tolist() == [0, 1]
    assert knn_graph(x, 1, 0.499).edges.tolist() == [[0, 1]] and self_dedup(x, 1, 0.499)[0].tolist() == [0]


def test_only_the_k_nearest_neighbours_are_linked():
    x, groups = groups_and_singletons()
    big = groups[0]  # 4 near-copies: with k=1 each row links to its single nearest one only
    graph = knn_graph(x[big], 1, 0.6)
    assert 2 <= len(graph.edges) <= 3  # a 1-NN graph of 4 rows: 2 or 3 distinct edges, never the full 6


def test_k_larger_than_n_and_tiny_inputs():
    x, groups = groups_and_singletons()
    assert self_dedup(x[:3], k=64)[0].size >= 1
    kept, graph = self_dedup(x[:1], k=64)
    assert kept.tolist() == [0] and graph.num_components == 1 and np.isneginf(graph.nearest).all()
    with pytest.raises(ValueError, match="curate.k"):
        knn_graph(x, 0, 0.6)


def circle(angles_deg, dim: int = 16) -> np.ndarray:
    """Unit rows on the circle spanned by the first two axes."""
    a = np.radians(np.asarray(angles_deg, np.float64))
    x = np.zeros((len(a), dim))
    x[:, 0], x[:, 1] = np.cos(a), np.sin(a)
    return x.astype(np.float32)


def test_relative_dedup_removes_every_copy_and_chain_of_an_evaluation_image():
    rng = np.random.default_rng(0)
    reference = np.concatenate([circle([0]), unit(np.eye(16)[[5]] + 0.0)])  # two evaluation images
    # pool: 0, 1 copies of reference 0; 2 -> 3 a chain leading away from it (55 deg steps: cos 0.57 per
    # step, but -0.34 from the reference at 110 deg); 4 a copy of reference 1; 5..9 unrelated
    copies = circle([3, -4, 55, 110])
    copy_of_second = unit(np.eye(16)[[5]] + 0.05 * rng.standard_normal((1, 16)))
    unrelated = unit(np.eye(16)[[8, 9, 10, 11, 12]] + 0.05 * rng.standard_normal((5, 16)))
    pool = np.concatenate([copies, copy_of_second, unrelated])
    assert float(pool[3] @ reference[0]) < 0.45  # 3 reaches reference 0 only through the chain
    clean, graph = relative_dedup(pool, reference, k=64, threshold=0.45)
    assert np.flatnonzero(~clean).tolist() == [0, 1, 2, 3, 4] and clean[5:].all()
    kept, stats = copydedup(pool, reference, k=64, threshold=0.6, relative_threshold=0.45)
    assert kept.tolist() == [5, 6, 7, 8, 9]
    assert stats["removed_relative"] == 5 and stats["removed_self"] == 0 and stats["num_reference"] == 2


def test_relative_dedup_runs_before_self_dedup():
    """A copy that links the pool to an evaluation image removes its whole component, even when
    self-dedup alone would keep the component's representative."""
    reference = circle([100])
    pool = circle([0, 50])  # 0 ~ 1 (cos 0.64 > 0.6); 1 ~ reference (cos 0.64 > 0.45); 0 vs reference: -0.17
    kept, stats = copydedup(pool, reference, k=8, threshold=0.6, relative_threshold=0.45)
    assert kept.tolist() == [] and stats["removed_relative"] == 2
    assert copydedup(pool, None, k=8, threshold=0.6)[0].tolist() == [0]


def test_stats_and_partners():
    x, groups = groups_and_singletons()
    kept, stats = copydedup(x, k=64, threshold=0.6)
    assert stats["removed_self"] == len(x) - 9 and stats["components"] == 9 and stats["largest_component"] == 4
    assert stats["components_with_copies"] == 3 and stats["edges"] == 10
    for g in groups:
        assert stats["partner"][g[0]] == -1 and (stats["partner"][g[1:]] == g[0]).all()
    assert (stats["nearest"][groups[0]] > 0.9).all() and (stats["nearest"][groups[-1]] < 0.6).all()


def test_mismatched_dims_are_refused():
    with pytest.raises(ValueError, match="64-d"):
        relative_dedup(np.ones((3, 64), np.float32), np.ones((2, 32), np.float32))
