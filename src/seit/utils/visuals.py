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
