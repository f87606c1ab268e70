"""``task=curate curate=<method>``: embeddings (task=embed) -> a subset manifest + a report.

Methods: kmeans (cluster only, keeps everything), semdedup, dbp (SemDeDup first when
``dedup_eps`` or ``dedup_target_kept`` is set), ssp, random, retrieval, hierarchical, copydedup
(DINOv2's k-NN-graph dedup, also against evaluation splits: run it before the others). The manifest
feeds training through ``data.subset=<out_dir>``; ``task.write_dataset=PATH`` also writes the kept
samples as a new token dataset. With several ranks (torchrun/srun), k-means trains and assigns
distributed over torch.distributed, and SemDeDup's in-cluster scoring is split over the ranks by
cluster (rank 0 merges it: the same result as one rank); the selection itself is cheap and runs
on rank 0. ``curate.device`` (auto | cpu | cuda) is where the dense maths runs: torch on cuda and
faiss's GPU index (faiss-gpu installed) when there is a GPU, unless it says cpu.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from seit.curation.embed import open_embeddings
from seit.curation.kmeans import cluster
from seit.curation.manifest import read_subset, write_subset
from seit.curation.report import write_report
from seit.data.dataset_info import TokenDatasetInfo
from seit.utils.knn import torch_device
from seit.utils.ranks import rank_world
from seit.utils.summary import config_hash, write_summary

log = logging.getLogger(__name__)
METHODS = ("kmeans", "semdedup", "dbp", "ssp", "random", "retrieval", "hierarchical", "copydedup")
NEEDS_CLUSTERS = ("kmeans", "semdedup", "dbp", "ssp", "retrieval")


def curate(cfg: DictConfig) -> dict:
    c = cfg.get("curate")
    if not c or c.get("method") not in METHODS:
        raise ValueError(f"task=curate needs curate=<method>, one of {METHODS} (conf/curate/)")
    t = cfg.task
    info = TokenDatasetInfo.open(cfg.data.root)
    store = open_embeddings(t.embeddings)
    store.check_against(info, t.split)
    start = time.perf_counter()
    device = str(c.get("device", "auto"))
    torch_device(device)  # an unknown name, or cuda without a GPU, fails here with the key named
    if c.method in NEEDS_CLUSTERS:  # the rest runs on rank 0 alone: no collective may wait for the others
        _init_distributed(device)
    rank, _ = rank_world()
    clusters = None
    if c.method in NEEDS_CLUSTERS:
        k = c.kmeans
        bar = tqdm(total=len(store), desc="k-means: assign", unit="pt", disable=rank != 0 or None)
        clusters = cluster(store, int(k.k), int(k.niter), int(k.seed), int(k.sample_per_centroid), str(k.backend),
                           progress=bar.update, device=device)
        bar.close()
    alive = start_from(c, info, t.split, len(store))
    dedup = _dedup_scores(c, store, clusters, alive, rank) if _wants_dedup(c) else None  # every rank its clusters
    if rank != 0:
        return {}
    result = select(c, store, clusters, alive, dedup)
    out = Path(t.out_dir)
    score = result.pop("score", clusters.sim if clusters is not None else None)
    params = OmegaConf.to_container(c, resolve=True)
    subset = write_subset(out, info, t.split, store.keys, result.pop("kept"), clusters.label if clusters is not None else None,
                          score, method=c.method, params=params, embeddings=str(store.root))
    wall = time.perf_counter() - start
    loggers = _loggers(cfg)
    report = write_report(out, info, t.split, store, clusters, subset, result, loggers=loggers)
    summary = {"task": "curate", "method": c.method, "manifest": str(out), "num_total": subset.meta["num_total"],
               "num_kept": subset.meta["num_kept"], "kept_fraction": subset.meta["kept_fraction"], "wall_s": round(wall, 3),
               "config_hash": config_hash(cfg), "output_dir": str(cfg.paths.output_dir), "report": report}
    if t.get("write_dataset"):
        from seit.curation.subset_dataset import write_subset_dataset

        summary["dataset"] = str(write_subset_dataset(info, subset, t.write_dataset))
    write_summary(Path(cfg.paths.output_dir), summary)
    for lg in loggers:
        lg.log_metrics({"curate/kept_fraction": subset.meta["kept_fraction"], "curate/num_kept": subset.meta["num_kept"]})
        lg.finalize("success")
    print(f"final: {c.method} kept {subset.meta['num_kept']} of {subset.meta['num_total']} "
          f"({100 * subset.meta['kept_fraction']:.1f}%) -> data.subset={out} ({wall:.1f}s)", flush=True)
    return summary


def start_from(c: DictConfig, info: TokenDatasetInfo, split: str, n: int) -> np.ndarray:
    """bool [n]: the points still in play: all, or the kept set of an earlier manifest
    (``curate.start_from``), e.g. SemDeDup on copy-detection features, then DBP on semantic ones."""
    alive = np.ones(n, bool)
    if c.get("start_from"):
        prior = read_subset(c.start_from)
        if prior.split != split:
            raise ValueError(f"curate.start_from={c.start_from} is a subset of split {prior.split!r}, not {split!r}")
        prior.check_against(info)
        alive[:] = False
        alive[prior.kept] = True
    return alive


def select(c: DictConfig, store, clusters, alive: np.ndarray, dedup: tuple | None = None) -> dict:
    """{"kept": indices, "score": per-point score (optional), ...report extras}. ``dedup``: SemDeDup's
    (M, partner) when already scored (over the ranks, ``_dedup_scores``); else scored here when needed."""
    n = len(store)
    if c.get("keep_fraction") is None:  # a method without a budget keeps what it keeps among the alive
        budget = int(alive.sum())
    elif not 0 < float(c.keep_fraction) <= 1:
        raise ValueError(f"curate.keep_fraction must be in (0, 1], got {c.keep_fraction}")
    else:
        budget = round(float(c.keep_fraction) * n)
    if budget > alive.sum():
        raise ValueError(f"curate.keep_fraction={c.keep_fraction} asks for {budget} samples, but only {alive.sum()} "
                         "are left (curate.start_from)")
    if c.method == "kmeans":
        return {"kept": np.flatnonzero(alive)}
    if c.method == "random":
        from seit.curation.ssp import random_select

        return {"kept": np.flatnonzero(alive)[random_select(int(alive.sum()), budget, int(c.seed))]}
    if c.method == "ssp":
        from seit.curation.ssp import ssp_select

        return {"kept": ssp_select(clusters, budget, str(c.keep), alive)}
    if c.method in ("semdedup", "dbp"):
        return _dedup_then_dbp(c, store, clusters, budget, alive, dedup)
    if c.method == "retrieval":
        return _retrieval(c, store, clusters)
    if c.method == "copydedup":
        return _copydedup(c, store, alive)
    return _hierarchical(c, store, budget)


def _wants_dedup(c: DictConfig) -> bool:
    """SemDeDup runs: curate=semdedup, or dbp with dedup_eps / dedup_target_kept set."""
    if c.method == "semdedup":
        return c.get("eps") is not None or c.get("target_kept") is not None
    return c.method == "dbp" and (c.get("dedup_eps") is not None or c.get("dedup_target_kept") is not None)


def _dedup_scores(c: DictConfig, store, clusters, alive: np.ndarray, rank: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup's (M, partner); with several ranks each scores its share of the clusters (all ranks
    call this) and rank 0 gets the merged result."""
    from seit.curation.semdedup import semdedup_scores

    bar = tqdm(total=len(store), desc="SemDeDup", unit="pt", disable=rank != 0 or None)
    out = semdedup_scores(store, clusters, int(c.get("block", 4096)), int(c.get("probes", 1)), progress=bar.update,
                          alive=alive, device=str(c.get("device", "auto")))
    bar.close()
    return out


def _dedup_then_dbp(c: DictConfig, store, clusters, budget: int, alive: np.ndarray, dedup: tuple | None = None) -> dict:
    from seit.curation.semdedup import calibrate_eps, keep_mask

    out: dict = {}
    eps, target = (c.eps, c.target_kept) if c.method == "semdedup" else (c.get("dedup_eps"), c.get("dedup_target_kept"))
    if eps is not None or target is not None:
        m, partner = dedup if dedup is not None else _dedup_scores(c, store, clusters, alive)
        # target_kept: a share of the points still in play (all, or curate.start_from's survivors)
        eps = float(eps) if eps is not None else calibrate_eps(m[alive], float(target))
        alive = alive & keep_mask(m, eps)
        out.update(eps=eps, dedup_m=m, dedup_partner=partner, dedup_alive=alive,
                   eps_curve={f"{e:g}": float(keep_mask(m, e).mean()) for e in (1e-3, 0.01, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)})
        log.info("SemDeDup eps=%.4g keeps %d of %d", eps, alive.sum(), len(alive))
    if c.method == "semdedup":
        out.update(kept=np.flatnonzero(alive), score=out["dedup_m"])
        return out
    from seit.curation.dbp import dbp_select

    kept, stats = dbp_select(clusters, alive, min(budget, int(alive.sum())), tau=float(c.tau),
                             neighbours=int(c.neighbours), balance=float(c.balance), keep=str(c.keep),
                             seed=int(c.kmeans.seed))
    out.update(kept=kept, dbp=stats)
    return out


def _seed_rows(c: DictConfig, store) -> tuple[np.ndarray, np.ndarray | None]:
    """(seed vectors, their indices in this store or None): from a key list, or another store."""
    if c.get("seed_embeddings"):
        seeds = open_embeddings(c.seed_embeddings)
        if seeds.meta["dim"] != store.meta["dim"] or seeds.meta.get("checkpoint_sha256") != store.meta.get("checkpoint_sha256"):
            raise ValueError(f"curate.seed_embeddings={c.seed_embeddings} ({seeds.meta['dim']}-d, "
                             f"{seeds.meta.get('checkpoint')}) was not embedded by the model of {store.root} "
                             f"({store.meta['dim']}-d, {store.meta.get('checkpoint')}): their cosines mean nothing")
        return np.asarray(seeds.vectors, np.float32), None
    path = Path(str(c.seed_keys))
    if not path.is_file():
        raise FileNotFoundError(f"curate.seed_keys={path} not found (one sample key a line)")
    wanted = [k for k in path.read_text().split() if k]
    index = {k: i for i, k in enumerate(store.keys)}
    missing = [k for k in wanted if k not in index]
    if missing:
        raise ValueError(f"curate.seed_keys: {len(missing)} keys are not in {store.root} (e.g. {missing[:3]})")
    rows = np.array(sorted(index[k] for k in wanted), np.int64)
    return np.asarray(store.vectors[rows], np.float32), rows


REFERENCE_MUST_MATCH = ("dim", "model_kind", "checkpoint_sha256", "whiten")


def _reference_rows(c: DictConfig, store) -> np.ndarray | None:
    """float32 [R, D]: the rows of every ``curate.reference_embeddings`` store in the pool's space."""
    paths = c.get("reference_embeddings")
    if not paths:
        return None
    return np.concatenate([_in_pool_space(open_embeddings(p), store) for p in ([paths] if isinstance(paths, str) else paths)])


def _in_pool_space(ref, store) -> np.ndarray:
    """A reference store's rows, refused unless embedded like the pool (dim, model or thumbnail grid,
    whitening). task=embed fits its PCA on the split it embeds, so a reference whitened by itself is
    refused; an unwhitened one of the same descriptor is whitened here with the pool's whitening.npz,
    exactly as task=embed whitens (float32 (raw - mean) @ projection; copydedup re-normalises)."""
    x = np.asarray(ref.vectors, np.float32)
    same_descriptor = all(ref.meta.get(k) == store.meta.get(k) for k in ("model_kind", "checkpoint_sha256"))
    if same_descriptor and store.meta.get("whiten") and not ref.meta.get("whiten"):
        w = np.load(store.root / "whitening.npz")
        if x.shape[1] == w["projection"].shape[0]:
            return (x - w["mean"]) @ w["projection"]
    diff = [k for k in REFERENCE_MUST_MATCH if ref.meta.get(k) != store.meta.get(k)]
    if diff:
        raise ValueError(f"curate.reference_embeddings: {ref.root} differs from {store.root} in "
                         f"{', '.join(f'{k} ({ref.meta.get(k)} vs {store.meta.get(k)})' for k in diff)}: "
                         "embed the reference split with the pool's task.features/thumbnail_grid (and task.whiten=0)")
    if store.meta.get("whiten") and not _same_whitening(ref.root, store.root):
        raise ValueError(f"curate.reference_embeddings: {ref.root}/whitening.npz is not {store.root}'s (each store "
                         "fits its own PCA): embed the reference with task.whiten=0, it is whitened with the pool's")
    return x


def _same_whitening(a: Path, b: Path) -> bool:
    wa, wb = np.load(a / "whitening.npz"), np.load(b / "whitening.npz")
    return all(np.array_equal(wa[k], wb[k]) for k in ("mean", "projection"))


def _copydedup(c: DictConfig, store, alive: np.ndarray) -> dict:
    from seit.curation.copydedup import copydedup

    rows = np.flatnonzero(alive)
    pool = np.asarray(store.vectors[rows], np.float32)
    local, stats = copydedup(pool, _reference_rows(c, store), k=int(c.k), threshold=float(c.threshold),
                             relative_threshold=float(c.relative_threshold), chunk=int(c.get("chunk", 4096)),
                             device=str(c.get("device", "auto")))
    n, local_partner = len(store), stats.pop("partner")
    moved = np.flatnonzero(local_partner >= 0)  # self-removed: replaced by their component's representative
    partner, m = np.full(n, -1, np.int64), np.full(n, -np.inf, np.float32)
    partner[rows[moved]] = rows[local_partner[moved]]
    m[rows[moved]] = np.einsum("ij,ij->i", pool[moved], pool[local_partner[moved]])
    score = np.full(n, np.nan, np.float32)  # a kept point's cosine to its nearest other survivor
    score[rows] = stats.pop("nearest")
    kept = rows[local]
    after = np.zeros(n, bool)
    after[kept] = True
    log.info("copydedup keeps %d of %d (relative dedup removed %d, self-dedup %d)", len(kept), len(rows),
             stats.get("removed_relative", 0), stats["removed_self"])
    return {"kept": kept, "score": score, "copydedup": stats, "dedup_m": m, "dedup_partner": partner,
            "dedup_alive": after}


def _retrieval(c: DictConfig, store, clusters) -> dict:
    from seit.curation.retrieval import cluster_based, sample_based

    seeds, seed_rows = _seed_rows(c, store)
    pool = np.setdiff1d(np.arange(len(store)), seed_rows if seed_rows is not None else [])
    if c.mode == "sample":
        kept, stats = sample_based(seeds, store, pool, int(c.k), device=str(c.get("device", "auto")))
    elif c.mode == "cluster":
        kept, stats = cluster_based(seeds, clusters, pool, int(c.min_seeds), int(c.per_cluster), int(c.seed),
                                    device=str(c.get("device", "auto")))
    else:
        raise ValueError(f"curate.mode must be sample or cluster, got {c.mode!r}")
    return {"kept": kept, "retrieval": {**stats, "num_seeds": int(len(seeds))}}


def _hierarchical(c: DictConfig, store, budget: int) -> dict:
    from seit.curation.hierarchical import balanced_sample, hierarchical_kmeans

    # in_memory: float32 N x d in RAM and faiss (fast); else level 1 streams the float16 memmap
    x = np.asarray(store.vectors, np.float32) if c.get("in_memory", False) else store.vectors
    h = hierarchical_kmeans(x, list(c.levels), resampling_steps=int(c.resampling_steps), niter=int(c.niter),
                            seed=int(c.seed), backend=str(c.backend), init=str(c.init),
                            device=str(c.get("device", "auto")), chunk=int(c.get("chunk", 16384)))
    kept = balanced_sample(h, budget, seed=int(c.seed), strategy=str(c.leaf_sampling))
    top = h.flat_sizes(len(h.levels) - 1)
    return {"kept": kept, "hierarchy": {"levels": [len(lv) for lv in h.levels], "top_sizes": top.tolist()}}


def _init_distributed(device: str = "auto") -> None:
    """One process group for k-means and SemDeDup: nccl when the maths runs on cuda (each rank on
    its LOCAL_RANK's GPU), else gloo."""
    rank, world = rank_world()
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        cuda = torch_device(device).type == "cuda"
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group("nccl" if cuda else "gloo")


def _loggers(cfg: DictConfig) -> list:
    from seit.pipelines.train import instantiate_all

    return instantiate_all(cfg.get("logger"))
