import itertools

import numpy as np
import pytest

from seit.curation.hierarchical import balanced_sample, find_subcluster_target_size, hierarchical_kmeans

GROUPS = (2000, 200, 50)


def _mixture(seed: int = 0):
    """Three well-separated (orthogonal) groups of very different sizes, unit-normalised."""
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(len(GROUPS)), GROUPS)
    x = np.eye(16)[group] + 0.15 * rng.standard_normal((len(group), 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), group


def _leximin_best(sizes, target):
    """Brute force: all allocations x <= sizes summing to min(target, sum) with the best sorted profile."""
    total = min(target, sum(sizes))
    allocs = [a for a in itertools.product(*(range(s + 1) for s in sizes)) if sum(a) == total]
    best = max(sorted(a) for a in allocs)
    return {a for a in allocs if sorted(a) == best}


def test_subcluster_target_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(25):
        sizes = rng.integers(0, 6, rng.integers(1, 6))
        target = int(rng.integers(0, sizes.sum() + 3))
        out = find_subcluster_target_size(sizes, target, np.random.default_rng(1))
        assert tuple(int(v) for v in out) in _leximin_best(sizes.tolist(), target)


def test_subcluster_target_caps_large_children_equally():
    sizes = np.array([3, 500, 7, 120, 1000, 40, 0])
    out = find_subcluster_target_size(sizes, 400, np.random.default_rng(0))
    assert out.sum() == 400 and (out <= sizes).all()
    np.testing.assert_array_equal(out[[0, 2, 5, 6]], sizes[[0, 2, 5, 6]])  # small ones whole
    capped = out[[1, 3, 4]]
    assert capped.max() - capped.min() <= 1
    np.testing.assert_array_equal(find_subcluster_target_size(sizes, 10_000, np.random.default_rng(0)), sizes)


def test_hierarchy_levels_partition_their_inputs_and_are_deterministic():
    x, _ = _mixture()
    h = hierarchical_kmeans(x, [20, 4], resampling_steps=3, seed=0, backend="torch")
    n_inputs = len(x)
    for t, level in enumerate(h.levels):
        assert all(len(m) for m in level)  # no empty nodes
        np.testing.assert_array_equal(np.sort(np.concatenate(level)), np.arange(n_inputs))
        assert h.centroids[t].shape == (len(level), x.shape[1])
        n_inputs = len(level)
    assert h.flat_sizes(1).sum() == len(x)
    sims = x[h.levels[0][0]] @ h.centroids[0][0]
    assert (np.diff(sims) <= 1e-6).all()  # members closest to the centroid first
    again = hierarchical_kmeans(x, [20, 4], resampling_steps=3, seed=0, backend="torch")
    for a, b in zip(h.levels, again.levels):
        assert all(np.array_equal(u, v) for u, v in zip(a, b))
    for a, b in zip(h.centroids, again.centroids):
        np.testing.assert_array_equal(a, b)


def test_balanced_sample_favours_small_groups():
    x, group = _mixture()
    h = hierarchical_kmeans(x, [20, 4], seed=0, backend="torch")
    for strategy in ("random", "closest"):
        sel = balanced_sample(h, 300, seed=0, strategy=strategy)
        assert len(sel) == 300 and len(np.unique(sel)) == 300
        kept = np.bincount(group[sel], minlength=3)
        assert kept[2] == 50  # uniform sampling would keep ~7 of them
        assert kept[1] >= 50  # uniform: ~27
    np.testing.assert_array_equal(balanced_sample(h, 300, seed=3), balanced_sample(h, 300, seed=3))
    np.testing.assert_array_equal(balanced_sample(h, 10_000), np.arange(len(x)))
    assert len(balanced_sample(h, 0)) == 0


def test_arguments_are_validated():
    x, _ = _mixture()
    with pytest.raises(ValueError, match="non-increasing"):
        hierarchical_kmeans(x, [4, 20])
    with pytest.raises(ValueError, match="exceeds"):
        hierarchical_kmeans(x[:3], [5])
    with pytest.raises(ValueError, match="one entry per level"):
        hierarchical_kmeans(x, [20, 4], resampling_steps=[1])
    h = hierarchical_kmeans(x[:100], [5], resampling_steps=0, backend="torch")
    with pytest.raises(ValueError, match="strategy"):
        balanced_sample(h, 10, strategy="farthest")
