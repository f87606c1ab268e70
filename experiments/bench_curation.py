"""Curation at scale on this machine: k-means + SemDeDup + DBP on N synthetic 256-d embeddings.

    python experiments/bench_curation.py                 # N = 1M, k = 1000
    python experiments/bench_curation.py --n 20000 --k 100
    python experiments/bench_curation.py --device cuda --points 200000 --json OUT.json   # bench_gpu_paths
    python experiments/bench_curation.py --hierarchical memmap --points 500000           # or: ram
    python experiments/bench_curation.py --semdedup-ranks 2 --points 100000             # 1 vs 2 gloo ranks

The embeddings are written as a task=embed store (float16 memmap) and read back the way task=curate
reads them: k-means trains on a sample of 256 points per centroid and assigns every point in
streamed chunks; SemDeDup and DBP then run cluster by cluster. The points are drawn around
k_true centres with a long-tailed (Zipf) size distribution and a per-centre spread, so clusters
differ in size and density as web data does. Prints wall time per stage and the process's peak
resident memory, and the linear extrapolation to 1B points.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from seit.curation.dbp import dbp_select  # noqa: E402
from seit.curation.embed import open_embeddings  # noqa: E402
from seit.curation.kmeans import assign_chunk, cluster  # noqa: E402
from seit.curation.semdedup import calibrate_eps, keep_mask, semdedup_scores  # noqa: E402
from seit.utils.knn import faiss_gpus, torch_device  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synthetic_store(root: Path, n: int, d: int, k_true: int, seed: int = 0, chunk: int = 1 << 16) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k_true, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, k_true + 1) ** 0.8
    weights /= weights.sum()
    spread = rng.uniform(0.02, 0.08, k_true).astype(np.float32)
    out = np.lib.format.open_memmap(root / "embeddings.npy", mode="w+", dtype=np.float16, shape=(n, d))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        c = rng.choice(k_true, m, p=weights)
        x = centres[c] + spread[c, None] * rng.normal(size=(m, d)).astype(np.float32)
        out[start:start + m] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    out.flush()
    del out
    (root / "keys.txt").write_text("".join(f"{i}\n" for i in range(n)))
    (root / "embeddings.json").write_text(json.dumps({"num_samples": n, "dim": d, "split_id": "synthetic",
                                                      "dataset": "synthetic", "split": "train"}))


def bench_gpu_paths(device: str, points: int, dim: int = 128, seeds: int = 1000, knn_k: int = 4) -> dict:
    """Wall seconds of the device-dependent curation paths on ``points`` synthetic ``dim``-d embeddings
    (a float16 store in a temp dir): spherical k-means (k = points / 2000) with the assignment of every
    point, SemDeDup's in-cluster scoring, and retrieval's k-NN of ``seeds`` seeds over the pool, each on
    ``device`` (auto | cpu | cuda, as ``curate.device``). Returns a JSON-able dict of the settings and times."""
    import torch

    from seit.curation.retrieval import knn_pool
    from seit.curation.semdedup import max_earlier_similarity

    dev = torch_device(device)
    k = max(2, points // 2000)
    out = {"device": str(dev), "torch_device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "faiss_gpus": faiss_gpus(device), "points": points, "dim": dim, "k": k, "seeds": seeds, "knn_k": knn_k}
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_store(Path(tmp), points, dim, k_true=2 * k)
        store = open_embeddings(tmp)
        max_earlier_similarity(np.eye(4, dim, dtype=np.float32), device=device)  # warm-up: CUDA context, kernels
        t0 = time.perf_counter()
        clusters = cluster(store, k, niter=10, seed=0, device=device)
        out["kmeans_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        m, _ = semdedup_scores(store, clusters, device=device)
        out["semdedup_s"] = round(time.perf_counter() - t0, 3)
        out["semdedup_largest_cluster"] = int(clusters.sizes.max())
        out["semdedup_kept_at_eps_0.05"] = round(float(keep_mask(m, 0.05).mean()), 4)
        q = np.asarray(store.vectors[np.linspace(0, points - 1, seeds).astype(np.int64)], np.float32)
        t0 = time.perf_counter()
        knn_pool(q, store, np.arange(points), knn_k, device=device)
        out["retrieval_knn_s"] = round(time.perf_counter() - t0, 3)
    return out


class PeakAnon:
    """Peak anonymous resident memory (RssAnon in /proc/self/status, sampled every 5 ms): what the
    process allocated, not the page cache a memmap maps (which ru_maxrss also counts)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _sample(self) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._sample())


def bench_hierarchical(mode: str, points: int, dim: int = 256, levels=(100, 20), steps: int = 2, niter: int = 10) -> dict:
    """task=curate curate=hierarchical's clustering on a float16 store of ``points`` x ``dim``: ``mode``
    "ram" loads float32 N x D and clusters with faiss (the old path, curate.in_memory=true), "memmap"
    streams the store (torch Lloyd). Run each mode in its own process for a clean peak."""
    from seit.curation.hierarchical import hierarchical_kmeans

    with tempfile.TemporaryDirectory() as tmp:
        synthetic_store(Path(tmp), points, dim, k_true=200)
        store = open_embeddings(tmp)
        with PeakAnon() as base:
            pass
        with PeakAnon() as peak:
            t0 = time.perf_counter()
            x = np.asarray(store.vectors, np.float32) if mode == "ram" else store.vectors
            h = hierarchical_kmeans(x, list(levels), resampling_steps=steps, niter=niter, seed=0, init="kmeans++",
                                    chunk=16384)
            wall = time.perf_counter() - t0
    return {"mode": mode, "points": points, "dim": dim, "levels": list(levels), "resampling_steps": steps,
            "niter": niter, "wall_s": round(wall, 2), "peak_anon_mib": round(peak.peak / 2**20, 1),
            "anon_before_mib": round(base.peak / 2**20, 1), "float32_matrix_mib": round(points * dim * 4 / 2**20, 1),
            "top_sizes": h.flat_sizes(len(h.levels) - 1).tolist()}


def _semdedup_rank(rank: int, world: int, port: int, root: str, k: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    store = open_embeddings(root)
    clusters = cluster(store, k, niter=10, seed=0, backend="torch", device="cpu")
    dist.barrier()
    t0 = time.perf_counter()
    m, partner = semdedup_scores(store, clusters, device="cpu")
    wall = time.perf_counter() - t0
    if rank == 0:
        np.savez(out, m=m, partner=partner, wall=wall)
    dist.destroy_process_group()


def bench_semdedup_ranks(points: int, world: int = 2, dim: int = 128) -> dict:
    """SemDeDup scoring on 1 process and on ``world`` gloo ranks (clusters split by cost), same
    clusters (torch k-means, distributed over the ranks too); checks the results are identical."""
    import os

    import torch

    k = max(2, points // 2000)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_store(Path(tmp), points, dim, k_true=2 * k)
        store = open_embeddings(tmp)
        clusters = cluster(store, k, niter=10, seed=0, backend="torch", device="cpu")
        t0 = time.perf_counter()
        m1, p1 = semdedup_scores(store, clusters, device="cpu")
        one = time.perf_counter() - t0
        out = str(Path(tmp) / "ranks.npz")
        torch.multiprocessing.spawn(_semdedup_rank, args=(world, 29900 + os.getpid() % 90, tmp, k, out), nprocs=world)
        r = np.load(out)
        same = bool(np.array_equal(r["m"], m1) and np.array_equal(r["partner"], p1))
    return {"points": points, "dim": dim, "k": k, "world": world, "one_rank_s": round(one, 2),
            f"{world}_ranks_s": round(float(r["wall"]), 2), "identical": same,
            "removed_at_eps_0.05": int((~keep_mask(m1, 0.05)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default=None, help="time bench_gpu_paths on this device (auto | cpu | cuda)")
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--json", default=None, help="write the result dict here")
    parser.add_argument("--hierarchical", choices=("ram", "memmap"), default=None)
    parser.add_argument("--semdedup-ranks", type=int, default=0, help="compare SemDeDup on 1 and this many gloo ranks")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--keep", type=float, default=0.5)
    args = parser.parse_args()
    if args.device or args.hierarchical or args.semdedup_ranks:
        if args.device:
            result = bench_gpu_paths(args.device, args.points)
        elif args.hierarchical:
            result = bench_hierarchical(args.hierarchical, args.points, args.dim)
        else:
            result = bench_semdedup_ranks(args.points, args.semdedup_ranks)
        print(json.dumps(result, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        synthetic_store(root, args.n, args.dim, k_true=2 * args.k)
        store = open_embeddings(root)
        times = {"generate": time.perf_counter() - t0}
        rss_before = peak_rss_gib()

        t0 = time.perf_counter()
        clusters = cluster(store, args.k, args.niter, seed=0)
        times["kmeans (train on 256/centroid + assign all)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _, block in store.chunks():
            assign_chunk(block, clusters.centroids)
        assign_s = time.perf_counter() - t0  # the assignment alone, repeated: the part that grows with N
        t0 = time.perf_counter()
        m, _ = semdedup_scores(store, clusters)
        eps = calibrate_eps(m, 0.8)
        alive = keep_mask(m, eps)
        times["semdedup (in-cluster O(n^2), eps for 80% kept)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        kept, _ = dbp_select(clusters, alive, round(args.keep * args.n))
        times["dbp (d_intra, d_inter, water-filling, keep)"] = time.perf_counter() - t0
        total = sum(v for k, v in times.items() if k != "generate")
        print(f"N={args.n:,} d={args.dim} k={args.k} niter={args.niter}: kept {len(kept):,}; "
              f"peak RSS {peak_rss_gib():.2f} GiB (after writing the store: {rss_before:.2f} GiB); "
              f"store {args.n * args.dim * 2 / 2**30:.2f} GiB on disk")
        for name, secs in times.items():
            print(f"  {name:<50} {secs:8.1f} s")
        print(f"  {'  of which the assignment of all N points':<50} {assign_s:8.1f} s")
        # k-means training is fixed by k (256 points per centroid); assignment, SemDeDup and DBP grow
        # with N (SemDeDup as N^2/k: at fixed k a cluster grows with N, so k must grow with N).
        print(f"  {'curation total':<50} {total:8.1f} s = {1e6 * total / args.n:.1f} s per 1M points")


if __name__ == "__main__":
    main()
