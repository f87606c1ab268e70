"""Pictures of a run's data: image grids, a confusion matrix, masked tokens greyed out.

Plain array-to-PNG helpers; what decodes tokens into images (a tokenizer) is the caller's, so this
module stays below every layer that draws (``pipelines.run_visuals``, curation reports, tasks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def image_grid(images: torch.Tensor, cols: int = 8) -> np.ndarray:
    """[N,3,H,W] in [0,1] -> one uint8 HxWx3 grid."""
    n, c, h, w = images.shape
    rows = -(-n // cols)
    grid = torch.ones(c, rows * (h + 2), cols * (w + 2))
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, col * (w + 2) + 1 : col * (w + 2) + 1 + w] = img
    return (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)


def confusion_png(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(matrix)
    side = min(max(5.0, 2 + 0.3 * n), 30.0)
    fig, ax = plt.subplots(figsize=(side, side))
    norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=6)
        ax.set_yticks(range(n), classes, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"val confusion (row-normalised), top-1 {np.trace(matrix) / max(matrix.sum(), 1):.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def masked_view(images: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Images [N,3,H,W] with the pixels of masked tokens [N,h,w] greyed out."""
    cover = torch.nn.functional.interpolate(token_mask[:, None].float(), size=images.shape[-2:], mode="nearest")
    return images * (1 - cover) + 0.5 * cover


CURVE_FIELDS = ("train_s", "samples_seen", "epoch", "step")  # the rest of a curve point are metrics


def curve_metric(curves: list[list[dict]], preferred: str | None = None) -> str | None:
    """The metric a time curve shows: val/acc1 when any point has it, else ``preferred`` (the run's
    optimized metric), else the first metric that a point holds; None when no point holds one."""
    keys = [k for points in curves for p in points for k in p if k not in CURVE_FIELDS]
    for name in ("val/acc1", preferred):
        if name in keys:
            return name
    return keys[0] if keys else None


def curve_png_name(metric: str) -> str:
    return "accuracy_vs_time.png" if metric == "val/acc1" else f"{metric.replace('/', '_')}_vs_time.png"


def time_curves_png(curves: dict[str, list[dict]], out_dir: Path, preferred: str | None = None) -> Path | None:
    """One line per run of its validation metric against training time (the TrainingBudget's
    clock: validation and checkpointing excluded), as the 24 h / 1 GPU benchmark plots top-1 against
    cumulative training hours. ``curves``: {label: curve points of summary.json}; the axis is in
    hours, minutes or seconds as the longest run needs. Writes ``accuracy_vs_time.png`` (val/acc1)
    or ``<metric>_vs_time.png`` into ``out_dir`` and returns its path; None when no point has a metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = curve_metric(list(curves.values()), preferred)
    if metric is None:
        return None
    longest = max((p["train_s"] for points in curves.values() for p in points), default=0.0)
    unit, scale = ("hours", 3600.0) if longest >= 7200 else ("minutes", 60.0) if longest >= 120 else ("seconds", 1.0)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        shown = [p for p in points if metric in p]
        ax.plot([p["train_s"] / scale for p in shown], [p[metric] for p in shown], marker="o", markersize=3,
                label=label or None)
    ax.set_xlabel(f"training time ({unit}; validation and checkpointing excluded)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if any(curves):
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / curve_png_name(metric)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
