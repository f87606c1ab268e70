"""SSP prototypicality pruning (Sorscher et al. 2022) and the random baseline.

The SSP score is a point's cosine similarity to its nearest centroid: prototypical = high. With
abundant data keep the hardest (least prototypical), with scarce data the easiest.
"""

from __future__ import annotations

import numpy as np

from seit.curation.kmeans import Clusters

KEEPS = ("hard", "easy")


def ssp_select(clusters: Clusters, budget: int, keep: str = "hard", alive: np.ndarray | None = None) -> np.ndarray:
    """The ``budget`` hardest (or easiest) of the ``alive`` points (default: all)."""
    if keep not in KEEPS:
        raise ValueError(f"curate.keep must be one of {KEEPS}, got {keep!r}")
    order = np.lexsort((np.arange(len(clusters.sim)), clusters.sim if keep == "hard" else -clusters.sim))
    if alive is not None:
        order = order[alive[order]]
    return np.sort(order[:budget])


def random_select(n: int, budget: int, seed: int = 0) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, budget, replace=False))
