"""Curation: budgets, calibration, k-means, SemDeDup semantics, manifests, embedding resume."""

import itertools
import json
import os

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import spawn_ranks, write_token_dataset
from seit.curation import embed as embed_mod
from seit.curation.dbp import dbp_select, water_fill
from seit.curation.embed import Embeddings, embed_split, open_embeddings
from seit.curation.kmeans import cluster
from seit.curation.manifest import read_subset, write_subset
from seit.curation.semdedup import calibrate_eps, keep_mask, max_earlier_similarity, semdedup_scores
from seit.data.datamodule import TokenDataModule
from seit.data.dataset_info import DatasetError, TokenDatasetInfo
from seit.utils.kmeans import kmeans, kmeans_pp


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _store(x, root="mem"):
    return Embeddings(root, {}, x.astype(np.float16), [str(i) for i in range(len(x))])


def _blobs(n=600, d=16, k=6, seed=0, spread=0.15):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(k, d)))
    return _unit(centres[rng.integers(0, k, n)] + spread * rng.normal(size=(n, d)))


# -- DBP budgets --------------------------------------------------------------------------------
def _brute_force(target, lower, upper, total):
    best, best_cost = None, np.inf
    for x in itertools.product(*[range(lo, hi + 1) for lo, hi in zip(lower, upper)]):
        if sum(x) == total:
            cost = float(((np.array(x) - target) ** 2).sum())
            if cost < best_cost - 1e-9:
                best, best_cost = np.array(x), cost
    return best, best_cost


@pytest.mark.parametrize("case", range(30))
def test_water_filling_matches_brute_force(case):
    rng = np.random.default_rng(case)
    k = int(rng.integers(2, 5))
    upper = rng.integers(0, 7, k)
    lower = np.minimum(rng.integers(0, 3, k), upper)
    total = int(rng.integers(lower.sum(), upper.sum() + 1))
    target = total * rng.dirichlet(np.ones(k) * 0.5)
    x = water_fill(target, lower, upper, total)
    assert x.sum() == total and np.all(x >= lower) and np.all(x <= upper)
    _, best_cost = _brute_force(target, lower, upper, total)
    assert ((x - target) ** 2).sum() == pytest.approx(best_cost, abs=1e-6)


def test_d_inter_in_blocks_is_the_mean_distance_to_the_l_nearest_other_centroids():
    from seit.curation.dbp import d_inter

    c = _unit(np.random.default_rng(0).normal(size=(300, 8)))
    dist = 1 - c.astype(np.float64) @ c.T
    np.fill_diagonal(dist, np.inf)
    np.testing.assert_allclose(d_inter(c, 20, block=64), np.sort(dist, 1)[:, :20].mean(1), atol=1e-6)


def test_water_filling_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="outside"):
        water_fill(np.array([1.0, 1.0]), np.array([0, 0]), np.array([1, 1]), 3)


def test_dbp_keeps_the_exact_budget_and_the_farthest_points():
    x = _blobs()
    clusters = cluster(_store(x), 6, niter=10, seed=0, backend="torch")
    alive = np.ones(len(x), bool)
    alive[::7] = False
    kept, stats = dbp_select(clusters, alive, 250, tau=0.1)
    assert len(kept) == 250 == stats["keep"].sum() and alive[kept].all()
    for j in range(clusters.k):  # inside a cluster the survivors closest to the centroid go first
        mine = kept[clusters.label[kept] == j]
        dropped = np.setdiff1d(np.flatnonzero(alive & (clusters.label == j)), mine)
        if len(mine) and len(dropped):
            assert clusters.sim[mine].max() <= clusters.sim[dropped].min()


# -- SemDeDup -----------------------------------------------------------------------------------
def test_eps_calibration_is_monotone_and_reaches_the_target():
    rng = np.random.default_rng(0)
    m = np.concatenate([rng.uniform(0.5, 1.0, 900).astype(np.float32), np.full(100, -np.inf, np.float32)])
    last = np.inf
    for target in np.linspace(0.1, 1.0, 19):
        eps = calibrate_eps(m, target)
        kept = keep_mask(m, eps).mean()
        assert eps <= last  # a larger kept fraction never needs a larger eps
        assert target <= kept <= target + 1 / len(m) + 1e-9  # at least the target, and no more than needed
        last = eps
    assert keep_mask(m, calibrate_eps(m, 0.1)).sum() == 100  # only the points nothing precedes


def test_semdedup_removes_later_duplicates_even_via_removed_ones():
    a = np.array([1.0, 0, 0])
    b = _unit(np.array([[1.0, 0.2, 0]]))[0]  # A~B and B~C, but A and C are apart
    c = _unit(np.array([[1.0, 0.4, 0]]))[0]
    m, arg = max_earlier_similarity(np.stack([a, b, c]))
    removed = ~keep_mask(m, eps=0.025)  # cos(A,B) = 0.981, cos(B,C) = 0.983, cos(A,C) = 0.928
    assert removed.tolist() == [False, True, True] and arg.tolist() == [-1, 0, 1]


def test_probes_find_duplicates_split_by_a_cluster_boundary():
    rng = np.random.default_rng(1)
    base = _unit(rng.normal(size=(400, 8)))
    copies = _unit(base[:100] + 0.02 * rng.normal(size=(100, 8)))
    store = _store(np.concatenate([base, copies]))
    clusters = cluster(store, 20, niter=10, seed=0, backend="torch")
    found = {}
    for probes in (1, 3):
        m, _ = semdedup_scores(store, clusters, probes=probes)
        removed = ~keep_mask(m, 0.01)
        found[probes] = np.mean(removed[:100] | removed[400:])
        assert removed[100:400].sum() == 0  # no false positives among the unrelated points
    assert found[3] >= found[1] and found[3] >= 0.98


def test_semdedup_after_an_earlier_step_compares_only_its_survivors():
    """A copy that an earlier step (curate.start_from) removed must not remove its kept original."""
    rng = np.random.default_rng(2)
    base = _unit(rng.normal(size=(200, 8)))
    copies = _unit(base[:50] + 0.02 * rng.normal(size=(50, 8)))
    store = _store(np.concatenate([base, copies]))
    clusters = cluster(store, 5, niter=10, seed=0, backend="torch")
    alive = np.ones(250, bool)
    alive[200:] = False  # the earlier step dropped every copy
    m, _ = semdedup_scores(store, clusters, probes=3, alive=alive)
    assert keep_mask(m, 0.01)[:200].all()  # each original is now alone: all kept
    assert np.isneginf(m[200:]).all()
    m_all, _ = semdedup_scores(store, clusters, probes=3)
    assert (~keep_mask(m_all, 0.01)[:50] | ~keep_mask(m_all, 0.01)[200:]).mean() > 0.9  # without: pairs found


# -- k-means ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_seeded_kmeans_is_deterministic_and_unit_norm(backend):
    x = _blobs()
    a, b = (kmeans(x, 6, niter=10, seed=3, spherical=True, backend=backend) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_kmeans_pp_seeds_one_centre_per_separated_blob():
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:6]
    blob = rng.choice(6, 600, p=[0.8, 0.1, 0.04, 0.03, 0.02, 0.01])  # uniform draws would miss the small blobs
    x = _unit(centres[blob] + 0.01 * rng.normal(size=(600, 8)))
    start = kmeans_pp(x, 6, seed=0, spherical=True)
    np.testing.assert_array_equal(start, kmeans_pp(x, 6, seed=0, spherical=True))
    assert sorted((start @ centres.T).argmax(1).tolist()) == list(range(6))


def test_clusters_order_is_farthest_first():
    clusters = cluster(_store(_blobs()), 6, niter=10, seed=0, backend="torch")
    assert sorted(clusters.order.tolist()) == list(range(600)) and clusters.sizes.sum() == 600
    for j in range(clusters.k):
        assert np.all(np.diff(clusters.sim[clusters.members(j)]) >= 0)


def _distributed_worker(rank, world, port, x, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    part = np.array_split(np.arange(len(x)), world)[rank]
    c = kmeans(x[part], 6, niter=8, seed=1, spherical=True, backend="torch")
    if rank == 0:
        np.save(out, c)
    dist.destroy_process_group()


def test_distributed_kmeans_matches_one_process(tmp_path):
    x = _blobs(seed=4)
    port = 29500 + os.getpid() % 1000
    spawn_ranks(_distributed_worker, port, x, str(tmp_path / "c.npy"))
    one = kmeans(x, 6, niter=8, seed=1, spherical=True, backend="torch")
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), one, atol=1e-5)


# -- manifests and the loader -------------------------------------------------------------------
@pytest.fixture
def dataset(tmp_path):
    write_token_dataset(tmp_path / "ds", counts={"train": [40, 30, 25], "val": [10]}, chunk_size=8)
    return TokenDatasetInfo.open(tmp_path / "ds")


def _keys(info, split="train"):
    from seit.data.shard_reader import read_shard

    return [k for p in info.shard_specs(split) for c in read_shard(p, info.load_codec()) for k in c.keys]


def test_manifest_round_trips_and_the_loader_sees_exactly_the_kept_keys(dataset, tmp_path):
    keys = _keys(dataset)
    kept = np.random.default_rng(0).choice(len(keys), 37, replace=False)
    write_subset(tmp_path / "subset", dataset, "train", keys, kept, np.arange(len(keys)) % 4,
                 np.linspace(0, 1, len(keys)), method="test")
    subset = read_subset(tmp_path / "subset")
    np.testing.assert_array_equal(subset.kept, np.sort(kept))
    rows = (tmp_path / "subset" / "subset.tsv").read_text().splitlines()[1:]
    assert [r.split("\t")[0] for r in rows] == [keys[i] for i in np.sort(kept)]
    cfg = OmegaConf.create({"root": str(dataset.root), "subset": str(tmp_path / "subset"), "batch_size": 4,
                            "eval_batch_size": 8, "num_workers": 0, "shuffle_buffer": 8, "pin_memory": False,
                            "train_split": "train", "val_split": "val"})
    dm = TokenDataModule(cfg)
    dm.setup()
    val = dm.stream("train", train=False)  # the eval path visits every kept sample once
    seen = [k for batch in val for k in batch["key"]]
    assert sorted(seen) == sorted(keys[i] for i in kept)
    train = dm.stream("train", train=True)
    assert len(train) == -(-37 // 4)
    got = {k for _ in range(3) for batch in train for k in _batch_keys(batch, keys, dataset)}
    assert got <= {keys[i] for i in kept}


def _batch_keys(batch, keys, info):
    """Training batches carry no keys: match the ids back to the samples they came from."""
    from seit.data.shard_reader import read_shard

    ids = np.concatenate([c.ids for p in info.shard_specs("train") for c in read_shard(p, info.load_codec())])
    flat = {ids[i].tobytes(): keys[i] for i in range(len(keys))}
    return [flat[x.numpy().tobytes()] for x in batch["ids"]]


def test_a_manifest_from_another_dataset_is_refused(dataset, tmp_path):
    write_token_dataset(tmp_path / "other", counts={"train": [40, 30, 26], "val": [10]}, chunk_size=8)
    other = TokenDatasetInfo.open(tmp_path / "other")
    write_subset(tmp_path / "subset", other, "train", _keys(other), [1, 2, 3], method="test")
    with pytest.raises(DatasetError, match="was made for"):
        read_subset(tmp_path / "subset").shard_masks(dataset)


# -- embeddings ---------------------------------------------------------------------------------
def test_interrupted_embed_resumes_to_the_same_result(dataset, tmp_path, monkeypatch):
    whole = embed_split(dataset, "train", None, tmp_path / "whole", features="thumbnail", thumbnail_grid=2)
    real = embed_mod.atomic_write_json
    calls = {"n": 0}

    def crash_after_first_shard(path, obj):
        if path.parent.name == ".progress" and path.name != "plan.json":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(embed_mod, "atomic_write_json", crash_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        embed_split(dataset, "train", None, tmp_path / "resumed", features="thumbnail", thumbnail_grid=2)
    monkeypatch.setattr(embed_mod, "atomic_write_json", real)
    assert not (tmp_path / "resumed" / "embeddings.json").exists()
    done = sorted(p.name for p in (tmp_path / "resumed" / ".progress").glob("train-*.json"))
    assert done == ["train-000000.tar.json"]
    resumed = embed_split(dataset, "train", None, tmp_path / "resumed", features="thumbnail", thumbnail_grid=2)
    np.testing.assert_array_equal(np.asarray(resumed.vectors), np.asarray(whole.vectors))
    assert resumed.keys == whole.keys == _keys(dataset)
    norms = np.linalg.norm(np.asarray(whole.vectors, np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)


def test_embeddings_whose_count_does_not_match_are_refused(dataset, tmp_path):
    store = embed_split(dataset, "train", None, tmp_path / "emb", features="thumbnail", thumbnail_grid=2)
    with pytest.raises(DatasetError, match="95 embeddings, but split 'val'"):
        store.check_against(dataset, "val")
    meta = json.loads((tmp_path / "emb" / "embeddings.json").read_text())
    meta["num_samples"] = 94
    (tmp_path / "emb" / "embeddings.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="damaged"):
        open_embeddings(tmp_path / "emb")


def test_whitened_thumbnails_have_the_asked_dims(dataset, tmp_path):
    store = embed_split(dataset, "train", None, tmp_path / "w", features="thumbnail", thumbnail_grid=2, whiten=8)
    x = np.asarray(store.vectors, np.float32)
    assert x.shape == (95, 8) and (tmp_path / "w" / "whitening.npz").is_file()
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)


def test_embed_splits_shards_over_ranks(dataset, tmp_path):
    """Two ranks (as torchrun sets RANK/WORLD_SIZE) share the shards and end with the one-process result."""
    import subprocess

    from conftest import REPO
    from fork_server import FORK_SERVER, env

    code = ("import sys; from seit.curation.embed import embed_split; from seit.data.dataset_info import TokenDatasetInfo; "
            f"embed_split(TokenDatasetInfo.open({str(dataset.root)!r}), 'train', None, {str(tmp_path / 'ranks')!r}, "
            "features='thumbnail', thumbnail_grid=2)")
    procs = [subprocess.Popen([FORK_SERVER.python(), "-c", code],
                              env=env(WORLD_SIZE="2", RANK=str(r), PYTHONPATH=str(REPO / "src"))) for r in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    records = {p.name: json.loads(p.read_text())["keys"] for p in (tmp_path / "ranks" / ".progress").glob("train-*.json")}
    assert len(records) == 3
    one = embed_split(dataset, "train", None, tmp_path / "one", features="thumbnail", thumbnail_grid=2)
    both = open_embeddings(tmp_path / "ranks")
    np.testing.assert_array_equal(np.asarray(both.vectors), np.asarray(one.vectors))
    assert both.keys == one.keys


def test_an_empty_subset_is_refused_by_the_loader(dataset, tmp_path):
    write_subset(tmp_path / "empty", dataset, "train", _keys(dataset), [], method="test")
    cfg = OmegaConf.create({"root": str(dataset.root), "subset": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="keeps no sample"):
        TokenDataModule(cfg).subset_masks("train")
