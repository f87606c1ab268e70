"""Nearest-code search: the one chunked lookup of a vector's closest codebook row.

Tokenizers (patch k-means, the VQ models, taming's VQGAN), the ViT's re-quantisation of
augmented embedding maps and the curation k-means all ask the same question, "which of K codes
is closest to each of N vectors", and all answer it here. The N x K score matrix is built a block
of rows at a time, so memory stays bounded however large N is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METRICS = ("l2", "ip", "cosine")
DEFAULT_CHUNK = 1 << 24  # score-matrix entries per block: 64 MB in float32


@torch.no_grad()
def nearest_code(x: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2", chunk: int = DEFAULT_CHUNK,
                 top: int | None = None, with_scores: bool = False):
    """The nearest codebook rows to each row of ``x``.

    Args:
        x: ``[N, D]`` floating vectors (N may be 0). Blocks of rows are moved to ``codebook``'s
            device, so ``x`` may stay on the CPU (even a ``torch.from_numpy`` view of a memmap).
        codebook: ``[K, D]`` codes, the same floating dtype as ``x``.
        metric: ``"l2"``: smallest squared euclidean distance ||x - c||^2, ranked by
            ||c||^2 - 2 x.c (||x||^2 is the same for every code of a row, so it is left out of
            the ranking); ``"ip"``: largest inner product x.c; ``"cosine"``: largest cosine,
            the rows of ``x`` l2-normalised here, block by block (a zero row scores 0), while the
            codebook must already have unit rows (normalise it once, e.g.
            ``F.normalize(codebook, dim=1)``: re-normalising unit vectors is not exact in
            floating point, and a lookup should not move the codes it was given).
        chunk: at most this many score entries (rows x K) are held at once; the rows per block
            are ``max(1, chunk // K)``, so a chunk smaller than K still works, one row at a time.
        top: None for the single nearest code per row; an int for the ``top`` nearest, best
            first (ties then fall in torch.topk's order).
        with_scores: also return each pick's score: the squared L2 distance (``"l2"``, >= 0, in
            the squared units of ``x``) or the inner product / cosine (``"ip"`` / ``"cosine"``).

    Returns:
        ids: int64 ``[N]`` (``top`` None; ties go to the lowest code index) or ``[N, top]``, on
        ``x``'s device; with ``with_scores``, ``(ids, scores)``, scores of the same shape in
        the score dtype. A lookup: no gradient flows through ids or scores.

    Raises:
        ValueError: ``x`` or ``codebook`` is not 2-D, their widths differ, the codebook is
            empty, ``metric`` is unknown, ``chunk`` < 1, ``top`` is outside [1, K], or (for
            ``"cosine"``) a codebook row's norm is not within 1e-3 of 1.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if x.ndim != 2 or codebook.ndim != 2:
        raise ValueError(f"x must be [N, D] and codebook [K, D], got {tuple(x.shape)} and {tuple(codebook.shape)}")
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(f"x has width {x.shape[1]} but the codebook has {codebook.shape[1]}")
    k = codebook.shape[0]
    if k == 0:
        raise ValueError("the codebook is empty")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if top is not None and not 1 <= top <= k:
        raise ValueError(f"top must be in [1, {k}] (the codebook size), got {top}")
    if metric == "cosine" and not torch.allclose(codebook.detach().float().norm(dim=1),
                                                codebook.new_ones(k, dtype=torch.float32), atol=1e-3):
        raise ValueError("metric='cosine' needs a codebook of unit rows (normalise it first)")
    c2 = (codebook * codebook).sum(1) if metric == "l2" else None
    shape = (x.shape[0],) if top is None else (x.shape[0], top)
    ids = torch.empty(shape, dtype=torch.long, device=x.device)
    scores = None
    rows = max(1, chunk // k)
    for start in range(0, x.shape[0], rows):
        block = x[start:start + rows].to(codebook.device)
        if metric == "cosine":
            block = F.normalize(block, dim=1)
        if metric == "l2":
            s = c2 - 2 * block @ codebook.T  # [rows, K]; smaller is nearer
        else:
            s = block @ codebook.T  # larger is nearer
        if top is None:
            pick = s.argmin(1) if metric == "l2" else s.argmax(1)
            best = s.gather(1, pick[:, None])[:, 0] if with_scores else None
        else:
            best, pick = s.topk(top, dim=1, largest=metric != "l2")
        stop = start + block.shape[0]
        ids[start:stop] = pick
        if with_scores:
            if metric == "l2":
                x2 = (block * block).sum(1)
                best = (best + (x2 if top is None else x2[:, None])).clamp_min(0)
            if scores is None:
                scores = torch.empty(shape, dtype=best.dtype, device=x.device)
            scores[start:stop] = best
    if with_scores:
        if scores is None:  # N == 0
            scores = torch.empty(shape, dtype=torch.promote_types(x.dtype, codebook.dtype), device=x.device)
        return ids, scores
    return ids
