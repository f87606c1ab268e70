"""seit.utils.kmeans: the k-means behind the patch codebook and curation's clusters."""

import numpy as np
import pytest

from seit.utils.kmeans import kmeans, kmeans_pp


def _blobs(k=5, per=200, d=6, spread=0.05, seed=0):
    """k well-separated euclidean blobs (centres 10 apart on the axes): points, true labels, centres."""
    rng = np.random.default_rng(seed)
    centres = 10 * np.eye(d, dtype=np.float32)[:k]
    label = np.repeat(np.arange(k), per)
    return (centres[label] + spread * rng.normal(size=(k * per, d))).astype(np.float32), label, centres


def _matched(centroids, centres):
    """For each true centre, the distance to its nearest centroid (every centre must be found)."""
    d = np.linalg.norm(centroids[:, None] - centres[None], axis=-1)
    return d.min(0)


def _objective(x, c):
    return float(((x[:, None] - c[None]) ** 2).sum(-1).min(1).mean())


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_recovers_well_separated_clusters(backend):
    x, _, centres = _blobs()
    c = kmeans(x, 5, niter=20, seed=0, backend=backend, init="kmeans++")
    assert c.shape == (5, 6) and c.dtype == np.float32
    assert _matched(c, centres).max() < 0.05  # each centroid sits on its blob's mean
    assert _objective(x, c) < 1.1 * 6 * 0.05 ** 2  # ~ the noise variance: nothing left to gain


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_random_init_improves_on_its_start(backend):
    x, _, _ = _blobs(k=5, spread=1.0)
    one = kmeans(x, 5, niter=1, seed=3, backend=backend)
    many = kmeans(x, 5, niter=20, seed=3, backend=backend)
    assert _objective(x, many) <= _objective(x, one) + 1e-6


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_spherical_gives_unit_centroids_on_the_directions(backend):
    x, _, centres = _blobs()
    c = kmeans(x, 5, niter=20, seed=1, spherical=True, backend=backend, init="kmeans++")
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    assert _matched(c, centres / 10).max() < 0.02


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_same_seed_same_centroids(backend):
    x, _, _ = _blobs(k=6, spread=2.0)  # overlapping blobs: the answer depends on the start
    a, b = (kmeans(x, 6, niter=5, seed=7, backend=backend) for _ in range(2))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_pp_picks_one_point_per_blob(seed):
    x, label, _ = _blobs(k=5, per=400)
    keep = np.concatenate([np.flatnonzero(label == j)[:n] for j, n in enumerate([400, 50, 30, 10, 5])])
    x, label = x[keep], label[keep]  # unequal blobs: uniform draws would miss the small ones
    start = kmeans_pp(x, 5, seed=seed)
    rows = [int(np.flatnonzero((x == s).all(1))[0]) for s in start]  # the centres are data points
    assert sorted(label[rows].tolist()) == [0, 1, 2, 3, 4]


def test_bad_arguments():
    x, _, _ = _blobs(k=2, per=3)
    for kwargs, match in [({"backend": "sklearn"}, "backend"), ({"init": "grid"}, "init")]:
        with pytest.raises(ValueError, match=match):
            kmeans(x, 2, niter=1, seed=0, **kwargs)
    for k in (0, 7):
        with pytest.raises(ValueError, match="needs 1 <= k"):
            kmeans(x, k, niter=1, seed=0)
