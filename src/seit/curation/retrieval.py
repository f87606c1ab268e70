"""DINOv2-style retrieval curation: grow a small curated seed set from an uncurated pool.

Sample-based (large seed sets): the k nearest pool points (cosine) of every seed, united; the
same point retrieved by several seeds is a "collision" and counted once. Cluster-based (small
seed sets): k-means the pool, then every cluster holding more than ``min_seeds`` seeds gives
``per_cluster`` of its points (all of them when it has fewer), drawn at random.
"""

from __future__ import annotations

import numpy as np
import torch

from seit.curation.kmeans import Clusters, assign_chunk
from seit.utils.knn import torch_device


def knn_pool(seeds: np.ndarray, store, pool: np.ndarray, k: int, chunk: int = 1 << 16,
             device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(indices int64 [S, k], cosine similarities float32 [S, k]) of each seed's k nearest pool
    points, best first; -1 / -inf where the pool has fewer than k points.

    ``seeds`` [S, D] unit rows; ``store`` an Embeddings (streamed ``chunk`` rows at a time);
    ``pool`` the store indices that may be retrieved. Runs on ``torch_device(device)``: the seeds
    and the running top-k stay there, each block of the store is moved to it.
    """
    dev = torch_device(device)
    q = torch.from_numpy(np.ascontiguousarray(seeds, dtype=np.float32)).to(dev)
    best_s = torch.full((len(q), k), -torch.inf, device=dev)
    best_i = torch.full((len(q), k), -1, dtype=torch.int64, device=dev)
    is_pool = np.zeros(len(store), bool)
    is_pool[pool] = True
    for start, block in store.chunks(chunk):
        sims = q @ torch.from_numpy(block).to(dev).T
        sims[:, torch.from_numpy(~is_pool[start:start + len(block)]).to(dev)] = -torch.inf
        idx = torch.arange(start, start + len(block), device=dev).expand(len(q), -1)
        cat_s, cat_i = torch.cat([best_s, sims], 1), torch.cat([best_i, idx], 1)
        best_s, pos = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
        best_i = cat_i.gather(1, pos)
    return best_i.cpu().numpy(), best_s.cpu().numpy()


def sample_based(seeds: np.ndarray, store, pool: np.ndarray, k: int, device: str = "auto") -> tuple[np.ndarray, dict]:
    idx, sims = knn_pool(seeds, store, pool, k, device=device)
    found = idx[np.isfinite(sims)]
    kept = np.unique(found)
    return kept, {"retrieved": int(found.size), "unique": int(kept.size), "collisions": int(found.size - kept.size)}


def cluster_based(seeds: np.ndarray, clusters: Clusters, pool: np.ndarray, min_seeds: int, per_cluster: int,
                  seed: int = 0, device: str = "auto") -> tuple[np.ndarray, dict]:
    seed_label = assign_chunk(seeds, clusters.centroids, device=device)[0][:, 0]
    hits = np.bincount(seed_label, minlength=clusters.k)
    chosen = np.flatnonzero(hits > min_seeds)
    rng = np.random.default_rng(seed)
    in_pool = np.zeros(len(clusters.label), bool)
    in_pool[pool] = True
    kept = []
    for j in chosen:
        members = clusters.members(j)
        members = members[in_pool[members]]
        kept.append(members if len(members) <= per_cluster else rng.choice(members, per_cluster, replace=False))
    kept = np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)
    return kept, {"clusters_chosen": int(len(chosen)), "seeds_per_cluster": hits.tolist()}
