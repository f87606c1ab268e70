"""What a curation run shows: ``report.json`` plus PNG plots, also logged to wandb when it is a logger.

    cluster_sizes.png            cluster-size histogram, before and after selection
    keep_rate_vs_complexity.png  DBP: each cluster's kept fraction against its complexity
    duplicates.png               SemDeDup, copydedup: the most similar removed points beside the point
                                 that removed them (copydedup: their component's representative),
                                 decoded back to images by the dataset's tokenizer

copydedup's graph statistics (components, largest component, edges, removed by relative and by
self-dedup) go to ``report.json`` under ``copydedup``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from seit.data.dataset_info import TokenDatasetInfo
from seit.data.shard_reader import read_rows
from seit.utils.io import atomic_write_json

log = logging.getLogger(__name__)
SHOW_PAIRS = 12


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _summary(values: np.ndarray) -> dict:
    v = np.asarray(values, np.float64)
    return {"min": float(v.min()), "median": float(np.median(v)), "mean": float(v.mean()), "max": float(v.max())} if v.size else {}


def write_report(out: Path, info: TokenDatasetInfo, split: str, store, clusters, subset, result: dict,
                 loggers: list = ()) -> dict:
    kept = subset.kept
    report: dict = {"method": subset.meta["method"], "num_total": subset.meta["num_total"], "num_kept": subset.meta["num_kept"]}
    for key in ("eps", "eps_curve", "retrieval", "hierarchy", "copydedup"):
        if key in result:
            report[key] = result[key]
    plots = []
    if clusters is not None:
        after = np.bincount(clusters.label[kept], minlength=clusters.k)
        report["clusters"] = {"k": clusters.k, "empty": int((clusters.sizes == 0).sum()), "size": _summary(clusters.sizes),
                              "kept_size": _summary(after), "sim_to_centroid": _summary(clusters.sim)}
        plots.append(_cluster_sizes(out, clusters.sizes, after))
    if "dbp" in result:
        s = result["dbp"]
        rate = np.divide(s["keep"], s["sizes"], out=np.zeros(len(s["sizes"])), where=s["sizes"] > 0)
        report["dbp"] = {"complexity": _summary(s["complexity"][np.isfinite(s["complexity"])]),
                         "keep_rate": _summary(rate[s["sizes"] > 0]), "share_max": float(s["share"].max())}
        plots.append(_keep_vs_complexity(out, s["complexity"], rate, s["sizes"]))
    if "dedup_m" in result:
        report["duplicates_removed"] = int((~result["dedup_alive"]).sum())
        try:
            plots.append(_duplicates(out, info, split, result["dedup_m"], result["dedup_partner"], result["dedup_alive"]))
        except (FileNotFoundError, KeyError, ValueError) as exc:  # a dataset without its tokenizer at hand
            log.warning("duplicates.png skipped: cannot decode tokens (%s)", exc)
    plots = [p for p in plots if p is not None]
    report["plots"] = [p.name for p in plots]
    atomic_write_json(out / "report.json", report)
    _log_images(loggers, plots)
    return report


def _cluster_sizes(out: Path, before: np.ndarray, after: np.ndarray) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(before, bins=min(50, max(5, len(before) // 4)))
    ax.hist(before, bins=bins, alpha=0.6, label="all points")
    ax.hist(after, bins=bins, alpha=0.6, label="kept")
    ax.set(xlabel="cluster size", ylabel="clusters", title=f"{len(before)} clusters")
    ax.legend()
    return _save(fig, out / "cluster_sizes.png")


def _keep_vs_complexity(out: Path, complexity: np.ndarray, rate: np.ndarray, sizes: np.ndarray) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ok = sizes > 0
    sc = ax.scatter(complexity[ok], rate[ok], c=np.log10(sizes[ok]), s=12, cmap="viridis")
    fig.colorbar(sc, label="log10 cluster size")
    ax.set(xlabel="complexity d_inter x d_intra", ylabel="kept fraction of the cluster", title="DBP keep rate")
    return _save(fig, out / "keep_rate_vs_complexity.png")


def _duplicates(out: Path, info: TokenDatasetInfo, split: str, m: np.ndarray, partner: np.ndarray,
                alive: np.ndarray) -> Path | None:
    from seit.tokenizers import load_tokenizer
    from seit.utils.visuals import image_grid

    removed = np.flatnonzero(~alive & (partner >= 0))
    if not removed.size:
        return None
    show = removed[np.argsort(-m[removed], kind="stable")[:SHOW_PAIRS]]
    pairs = np.stack([partner[show], show], 1).reshape(-1)  # survivor-side point, then the removed one
    tokenizer = load_tokenizer(info.meta["tokenizer"]["checkpoint"])
    with torch.no_grad():
        images = tokenizer.decode(torch.from_numpy(read_rows(info, split, pairs).astype(np.int64)))
    from PIL import Image

    path = out / "duplicates.png"
    Image.fromarray(image_grid(images.float().cpu(), cols=8)).save(path)
    return path


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def _log_images(loggers, paths: list[Path]) -> None:
    from pytorch_lightning.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            for p in paths:
                lg.log_image(key=f"curate/{p.stem}", images=[str(p)])
