"""DINOv2's self-distillation objective (Oquab et al. 2023, §4 and its ``dinov2/loss``;
../shared/reference/curation-and-efficient-vit.md §4.4-4.5), on any backbone of ours.

- ``DinoHead``: MLP -> L2-normalised bottleneck -> prototypes with unit-norm rows (the weight-normed
  last layer with its gain fixed at 1); one for the class token (DINO), one for patches (iBOT).
- ``DinoModel``: a ``TokenViT`` with a class token, the two heads and iBOT's learned mask token.
- The teacher's targets: Sinkhorn-Knopp (``sinkhorn_knopp``, 3 iterations) or softmax centering
  (``SoftmaxCenter``); the losses (``dino_loss``, ``ibot_loss``, ``koleo_loss``) reduce in float32
  whatever the autocast dtype.
- ``block_masks``: iBOT's block-wise masks for the student's global crops, batched.

Shapes: B samples, K prototypes, E backbone width, h x w the patch grid of a crop.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class DinoHead(nn.Module):
    """[.., E] -> prototype scores [.., K]: ``layers`` Linear/GELU layers to ``bottleneck``, L2
    normalisation, then cosine with K unit-norm prototypes (DINOv2's head: hidden 2048, bottleneck 256,
    65536 prototypes for ViT-S/B; 3 layers)."""

    def __init__(self, in_dim: int, prototypes: int, hidden: int = 2048, bottleneck: int = 256, layers: int = 3):
        super().__init__()
        if layers < 1 or prototypes < 2:
            raise ValueError(f"a DINO head needs layers >= 1 and prototypes >= 2, got {layers} and {prototypes}")
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        parts: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            parts.append(nn.Linear(a, b))
            if i < layers - 1:
                parts.append(nn.GELU())
        self.mlp = nn.Sequential(*parts)
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return F.linear(z, F.normalize(self.prototypes, dim=-1, eps=1e-6))


class DinoModel(nn.Module):
    """A class-token backbone (``TokenViT`` with ``class_token=True``) with DINO and iBOT heads.

    ``tokens(map, mask)``: the embedding map (tokens) or normalised image (pixels) ``[B, C, H, W]`` ->
    (class token [B, E], patch tokens [B, h*w, E]) after the final norm; ``mask`` [B, h, w] (bool)
    replaces those patches by the learned mask token before the position embedding (iBOT).
    """

    def __init__(self, backbone: nn.Module, dino_head: DinoHead, ibot_head: DinoHead):
        super().__init__()
        vit = backbone.vit
        if not vit.has_class_token or vit.num_prefix_tokens != 1:
            raise ValueError("a DINO backbone needs model.class_token=true (and no register tokens)")
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, vit.embed_dim))

    def tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        vit = self.backbone.vit
        p = vit.patch_embed(self.backbone.body_input(x))  # [B, h, w, E] (dynamic_img_size) or [B, h*w, E]
        if mask is not None:
            m = mask.reshape(p.shape[:-1] + (1,))
            p = torch.where(m, self.mask_token.reshape((1,) * (p.dim() - 1) + (-1,)).to(p.dtype), p)
        out = vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(p)))))
        return out[:, 0], out[:, 1:]

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"backbone.{n}" for n in self.backbone.no_weight_decay()}


# -- teacher targets ---------------------------------------------------------------------------
@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets [N, K] from scores [N, K] by Sinkhorn-Knopp (SwAV; DINOv2's centering):
    exp(scores / T) alternately scaled so that every prototype gets an equal share of the batch and
    every sample a distribution; ends with each row summing to 1. Under torch.distributed the sums
    run over all ranks' rows (each rank may hold a different number, as iBOT's masked patches do)."""
    q = logits.float() / temperature
    peak = q.max()
    if _distributed():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    q = torch.exp(q - peak).t()  # [K, N]; the shift cancels in the normalisations
    n = torch.tensor(float(q.shape[1]), device=q.device)
    total = q.sum()
    if _distributed():
        dist.all_reduce(n)
        dist.all_reduce(total)
    q /= total
    k = q.shape[0]
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        if _distributed():
            dist.all_reduce(rows)
        q /= rows.clamp_min(1e-30) * k  # an all-zero row or column (exp underflow) stays zero, not NaN
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30) * n
    return (q * n).t()


class SoftmaxCenter(nn.Module):
    """DINO's centering: softmax((scores - c) / T), c an EMA (``momentum``) of the teacher's mean score,
    updated after use (all ranks' mean). The centre is a buffer: it resumes with the checkpoint."""

    def __init__(self, prototypes: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, prototypes))

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        out = torch.softmax((logits.float() - self.center) / temperature, dim=-1)
        mean = logits.float().mean(0, keepdim=True)
        if _distributed():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        self.center.mul_(self.momentum).add_(mean, alpha=1 - self.momentum)
        return out


# -- losses ------------------------------------------------------------------------------------
def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """Cross-entropy of the teacher's targets against the student's softmax(scores / ``temperature``)
    over every (student crop, teacher crop) pair but a global crop with itself, averaged over pairs
    and samples. ``student``: per crop [B, K] scores (global crops first, in the teacher's order);
    ``teacher``: per global crop [B, K] targets (rows sum to 1)."""
    logp = [torch.log_softmax(s.float() / temperature, dim=-1) for s in student]
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        for j, lp in enumerate(logp):
            if i != j:
                total = total - (t * lp).sum(-1).mean()
                pairs += 1
    return total / max(1, pairs)


def ibot_loss(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, images: int,
              temperature: float = 0.1) -> torch.Tensor:
    """iBOT's patch loss: cross-entropy of teacher targets [M, K] against student scores [M, K] on M
    selected patches; ``weight`` [M] is 1 / (selected patches of that patch's image), so each image
    counts once, and the sum is divided by ``images`` (all images of the global crops, DINOv2's norm)."""
    ce = -(teacher * torch.log_softmax(student.float() / temperature, dim=-1)).sum(-1)
    return (ce * weight).sum() / max(1, images)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Sablayrolles et al. 2019; DINOv2): -mean_i log(min_{j != i} ||x_i - x_j||) over the
    L2-normalised rows of x [B, E]; spreads the batch's features uniformly. Needs B >= 2."""
    if x.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 samples, got {x.shape[0]}")
    z = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sims = z @ z.t()
        sims.fill_diagonal_(-2.0)
        nearest = sims.argmax(1)
    dist_ = F.pairwise_distance(z, z[nearest], eps=eps)
    return -torch.log(dist_ + eps).mean()


# -- masks -------------------------------------------------------------------------------------
def mask_ratios(n: int, probability: float, low: float, high: float, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """Per-image mask ratios [n] (DINOv2's collate): int(n * ``probability``) images get ratios spread
    over [low, high] (one draw in each of as many equal bins), the rest 0; shuffled over the batch."""
    if not 0 <= probability <= 1 or not 0 <= low <= high <= 1:
        raise ValueError(f"need 0 <= mask probability <= 1 and 0 <= low <= high <= 1, got {probability}, [{low}, {high}]")
    masked = int(n * probability)
    edges = torch.linspace(low, high, masked + 1, device=device)
    u = torch.rand(masked, generator=generator, device=device)
    ratios = torch.zeros(n, device=device)
    ratios[:masked] = edges[:-1] + u * (edges[1:] - edges[:-1])
    return ratios[torch.randperm(n, generator=generator, device=device)]


def block_masks(ratios: torch.Tensor, height: int, width: int, generator: torch.Generator | None = None,
                min_patches: int = 4, aspect: tuple[float, float] = (0.3, 1 / 0.3), tries: int = 16) -> torch.Tensor:
    """iBOT / BEiT block-wise masks [n, height, width] (bool), all images at once: each image draws
    ``tries`` rectangles (area from ``min_patches`` to its target, log-uniform aspect in ``aspect``) and
    keeps the longest prefix whose union stays within its target, floor(ratio * height * width)
    patches; an image with ratio 0 (or a target below one rectangle) is not masked."""
    n, device = ratios.shape[0], ratios.device
    target = torch.floor(ratios * height * width)
    u = torch.rand(n, tries, 4, generator=generator, device=device)
    area = min_patches + u[..., 0] * (target[:, None] - min_patches).clamp_min(0)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    ar = torch.exp(log_lo + u[..., 1] * (log_hi - log_lo))
    bh = torch.round(torch.sqrt(area * ar)).clamp(1, height)
    bw = torch.round(torch.sqrt(area / ar)).clamp(1, width)
    top = torch.floor(u[..., 2] * (height - bh + 1))
    left = torch.floor(u[..., 3] * (width - bw + 1))
    rows = torch.arange(height, device=device)[None, None, :, None]
    cols = torch.arange(width, device=device)[None, None, None, :]
    inside = ((rows >= top[..., None, None]) & (rows < (top + bh)[..., None, None])
              & (cols >= left[..., None, None]) & (cols < (left + bw)[..., None, None]))  # [n, tries, h, w]
    union = inside.to(torch.uint8).cummax(dim=1).values.bool()
    fits = union.sum((2, 3)) <= target[:, None]  # union sizes grow with the prefix: a prefix fits
    kept = fits.sum(1)
    pick = union[torch.arange(n, device=device), (kept - 1).clamp_min(0)]
    return pick & (kept > 0)[:, None, None] & (target > 0)[:, None, None]
