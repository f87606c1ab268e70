"""Curation at GPU and cluster scale: the device / faiss choice, SemDeDup split over ranks by
cluster, and hierarchical k-means streamed from a float16 memmap (issue #20, part B)."""

from __future__ import annotations

import json
import os
import tracemalloc
import types

import numpy as np
import pytest
import torch
from conftest import spawn_ranks

from seit.curation.embed import Embeddings, open_embeddings
from seit.curation.hierarchical import hierarchical_kmeans
from seit.curation.kmeans import cluster
from seit.curation.retrieval import knn_pool
from seit.curation.semdedup import cluster_owners, max_earlier_similarity, merge_scores, semdedup_scores
from seit.utils import knn as knn_mod
from seit.utils.kmeans import Rows, kmeans, kmeans_pp
from seit.utils.knn import flat_ip_index, torch_device

CUDA = torch.cuda.is_available()


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _store(x, root="mem"):
    return Embeddings(root, {}, x.astype(np.float16), [str(i) for i in range(len(x))])


def _duplicated(n=300, d=8, copies=100, seed=1):
    rng = np.random.default_rng(seed)
    base = _unit(rng.normal(size=(n, d)))
    return np.concatenate([base, _unit(base[:copies] + 0.02 * rng.normal(size=(copies, d)))])


def _memmap_store(root, n, d, seed=0, chunk=8192):
    """A task=embed-like store (float16 .npy memmap) of n unit rows around 12 centres, written in chunks."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(12, d)))
    out = np.lib.format.open_memmap(root / "embeddings.npy", mode="w+", dtype=np.float16, shape=(n, d))
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        out[s:s + m] = _unit(centres[rng.integers(0, 12, m)] + 0.3 * rng.normal(size=(m, d))).astype(np.float16)
    out.flush()
    del out
    (root / "keys.txt").write_text("".join(f"{i}\n" for i in range(n)))
    (root / "embeddings.json").write_text(json.dumps({"num_samples": n, "dim": d}))
    return open_embeddings(root)


# -- which device, which faiss -----------------------------------------------------------------
def test_device_names_resolve_and_bad_ones_name_the_key():
    assert torch_device("cpu").type == "cpu"
    assert torch_device("auto").type == ("cuda" if CUDA else "cpu")
    with pytest.raises(ValueError, match="curate.device"):
        torch_device("tpu")
    if not CUDA:
        with pytest.raises(ValueError, match="curate.device=cuda"):
            torch_device("cuda")


class _FakeFaiss(types.SimpleNamespace):
    """Stands in for a faiss build with GPU support: records which index class was built."""

    def __init__(self, gpus):
        super().__init__(get_num_gpus=lambda: gpus, IndexFlatIP=lambda d: ("cpu", d),
                         GpuIndexFlatIP=lambda res, d: ("gpu", d), StandardGpuResources=lambda: "res")


@pytest.mark.parametrize("gpus,device,k,kind", [(1, "auto", 65, "gpu"), (1, "cuda", 65, "gpu"), (1, "cpu", 65, "cpu"),
                                                (1, "auto", 4096, "cpu"), (0, "auto", 65, "cpu"), (0, "cuda", 65, "cpu")])
def test_faiss_gpu_index_only_when_faiss_has_a_gpu_and_the_device_allows(monkeypatch, gpus, device, k, kind):
    monkeypatch.setattr(knn_mod, "faiss_module", lambda: _FakeFaiss(gpus))
    assert flat_ip_index(16, device, k=k) == (kind, 16)
    assert knn_mod.faiss_gpus(device) == (gpus if device != "cpu" else 0)


def test_faiss_cpu_install_answers_cpu_index():
    import faiss

    if faiss.get_num_gpus() == 0:
        assert isinstance(flat_ip_index(8, "auto"), faiss.IndexFlatIP)


# -- the dense maths on a device ---------------------------------------------------------------
def test_max_earlier_similarity_on_cpu_is_the_brute_force():
    e = _duplicated(60, copies=20)
    m, arg = max_earlier_similarity(e, block=7, device="cpu")
    sims = e @ e.T
    for j in range(1, len(e)):
        assert arg[j] == int(np.argmax(sims[j, :j])) and m[j] == pytest.approx(sims[j, :j].max(), abs=1e-6)
    assert np.isneginf(m[0]) and arg[0] == -1
    if CUDA:
        mc, argc = max_earlier_similarity(e, block=7, device="cuda")
        np.testing.assert_allclose(mc[1:], m[1:], atol=1e-5)


def test_knn_pool_on_cpu_is_the_brute_force_over_the_pool():
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(500, 16)))
    seeds = _unit(rng.normal(size=(7, 16)))
    pool = np.setdiff1d(np.arange(500), np.arange(0, 500, 3))
    idx, sims = knn_pool(seeds, _store(x), pool, k=5, chunk=64, device="cpu")
    xf = x.astype(np.float16).astype(np.float32)
    brute = seeds @ xf[pool].T
    np.testing.assert_array_equal(idx, pool[np.argsort(-brute, axis=1)[:, :5]])
    assert set(idx.ravel()) <= set(pool)
    if CUDA:
        idc, _ = knn_pool(seeds, _store(x), pool, k=5, chunk=64, device="cuda")
        np.testing.assert_array_equal(idc, idx)


# -- SemDeDup over ranks -----------------------------------------------------------------------
def test_cluster_owners_balance_cost_and_are_deterministic():
    costs = np.array([100.0, 1, 1, 50, 49, 1, 0])
    owner = cluster_owners(costs, 2)
    load = np.bincount(owner, weights=costs, minlength=2)
    assert load.tolist() == [101.0, 101.0]  # LPT: 100 + 1 | 50 + 49 + 1 + 1
    np.testing.assert_array_equal(owner, cluster_owners(costs, 2))
    assert (cluster_owners(costs, 1) == 0).all()
    assert set(cluster_owners(np.ones(10), 4)) == {0, 1, 2, 3}


def test_merge_takes_the_largest_m_and_ties_go_to_the_lowest_cluster():
    idx = np.array([0, 1, 2])
    a = (idx, np.float32([0.5, 0.9, 0.7]), np.array([10, 11, 12]), np.array([3, 3, 3]))
    b = (idx, np.float32([0.6, 0.9, 0.7]), np.array([20, 21, 22]), np.array([5, 1, 7]))
    m, partner = merge_scores(4, [a, b])
    np.testing.assert_array_equal(m, np.float32([0.6, 0.9, 0.7, -np.inf]))
    np.testing.assert_array_equal(partner, [20, 21, 12, -1])
    m2, partner2 = merge_scores(4, [b, a])  # the order the parts arrive in does not matter
    np.testing.assert_array_equal(m2, m) and np.testing.assert_array_equal(partner2, partner)


CASES = ((1, False), (3, True))  # (probes, an earlier step removed every 7th point)


def _alive(n, with_alive):
    if not with_alive:
        return None
    alive = np.ones(n, bool)
    alive[::7] = False
    return alive


def _semdedup_worker(rank, world, port, x, clusters, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for probes, with_alive in CASES:
        seen = []
        m, partner = semdedup_scores(_store(x), clusters, block=16, probes=probes, alive=_alive(len(x), with_alive),
                                     device="cpu", progress=seen.append)
        np.savez(f"{out}.{probes}.{rank}.npz", m=m, partner=partner, seen=sum(seen))
    dist.destroy_process_group()


def test_semdedup_over_two_ranks_equals_one_rank(tmp_path):
    x = _duplicated()
    clusters = cluster(_store(x), 12, niter=8, seed=0, backend="torch", device="cpu")
    port = 29600 + os.getpid() % 1000
    out = str(tmp_path / "r")
    spawn_ranks(_semdedup_worker, port, x, clusters, out)
    for probes, with_alive in CASES:
        one_m, one_p = semdedup_scores(_store(x), clusters, block=16, probes=probes, alive=_alive(len(x), with_alive),
                                       device="cpu")
        assert (~(one_m <= 0.99)).sum() >= 50  # the copies are found
        r0, r1 = np.load(f"{out}.{probes}.0.npz"), np.load(f"{out}.{probes}.1.npz")
        np.testing.assert_array_equal(r0["m"], one_m)
        np.testing.assert_array_equal(r0["partner"], one_p)
        assert 0 < r1["seen"] and 0 < r0["seen"]  # both ranks scored clusters
        assert not np.array_equal(r1["m"], one_m)  # rank 1 holds only its own part


# -- k-means and the hierarchy on a memmap -----------------------------------------------------
def test_rows_read_blocks_subsets_and_takes_of_a_memmap(tmp_path):
    store = _memmap_store(tmp_path / "s", 1000, 8)
    full = np.asarray(store.vectors, np.float32)
    rows = Rows(store.vectors)
    assert not rows.in_memory and Rows(full).in_memory and len(rows) == 1000 and rows.dim == 8
    np.testing.assert_array_equal(np.concatenate([b for _, b in rows.blocks(300)]), full)
    sub = rows.subset(np.arange(0, 1000, 3)).subset(np.array([1, 5, 9]))
    np.testing.assert_array_equal(sub.array(), full[[3, 15, 27]])
    np.testing.assert_array_equal(rows.take(np.array([9, 2, 9])), full[[9, 2, 9]])


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_streamed_kmeans_equals_in_ram_kmeans(tmp_path, init):
    store = _memmap_store(tmp_path / "s", 3000, 16)
    full = np.asarray(store.vectors, np.float32)
    a = kmeans(Rows(store.vectors), 12, niter=6, seed=2, spherical=True, init=init, backend="auto", chunk=700,
               device="cpu")  # auto on a memmap: torch, streamed
    b = kmeans(full, 12, niter=6, seed=2, spherical=True, init=init, backend="torch", chunk=700, device="cpu")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(kmeans_pp(Rows(store.vectors), 5, 0, True, chunk=512), kmeans_pp(full, 5, 0, True, chunk=512))


def test_hierarchy_from_a_memmap_equals_the_in_ram_one(tmp_path):
    store = _memmap_store(tmp_path / "s", 4000, 16)
    kw = dict(resampling_steps=2, niter=5, seed=0, backend="torch", device="cpu", chunk=900)
    mem = hierarchical_kmeans(store.vectors, [24, 6], **kw)
    ram = hierarchical_kmeans(np.asarray(store.vectors, np.float32), [24, 6], **kw)
    for a, b in zip(mem.levels, ram.levels):
        assert len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))
    for a, b in zip(mem.centroids, ram.centroids):
        np.testing.assert_array_equal(a, b)
    assert mem.flat_sizes(1).sum() == 4000


def test_hierarchy_from_a_memmap_never_holds_the_float32_matrix(tmp_path):
    n, d = 60_000, 128  # float32 N x D: 30.7 MB; the float16 store on disk: 15.4 MB
    store = _memmap_store(tmp_path / "s", n, d)
    tracemalloc.start()
    try:
        h = hierarchical_kmeans(store.vectors, [40, 8], resampling_steps=1, niter=3, seed=0, backend="auto",
                                init="kmeans++", device="cpu", chunk=2048)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert h.flat_sizes(1).sum() == n
    # measured ~4 MB (labels, sort orders, a 1 MB block); a single float32 copy of the rows is 30.7 MB
    assert peak < n * d * 4 / 4, f"peak {peak / 1e6:.1f} MB"
    tracemalloc.start()
    try:
        hierarchical_kmeans(np.asarray(store.vectors, np.float32), [40, 8], resampling_steps=1, niter=3, seed=0,
                            backend="auto", device="cpu", chunk=2048)
        _, in_ram = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert in_ram > n * d * 4  # the check can fail: the in-RAM path does hold the matrix
