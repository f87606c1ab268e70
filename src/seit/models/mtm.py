"""SeiT++ masked token modeling (MAGE-style; ../shared/reference/seit-seitpp.md §F1).

The encoder reads code ids, not codebook vectors: a learned id embedding (LayerNorm, dropout)
and a non-overlapping k2 s2 stem give one patch per 2x2 tokens. Per batch a mask ratio r is
drawn from a truncated normal; per sample, random scores rank the patches, the lowest
``drop_ratio`` share is dropped from the encoder (MAE) and the rest of the lowest r share is
replaced by a learned mask token (MAGE). The decoder starts every position from the encoder's
cls output, keeps the encoder outputs only at visible patches, and predicts the ids of every
token through logits tied to the id embedding. The loss is the cross-entropy on masked patches.

``IdPatchEmbed`` is also the stem of the fine-tuned classifier (``model.embedding=learned``),
so the pre-trained encoder hands over by parameter name.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from seit.models.tokenadapt import sincos_pos

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class IdPatchEmbed(PatchEmbed):
    """ids [B,H,W] -> [B, H/2 * W/2, width]: learned embedding + LayerNorm + dropout, then a k2 s2 conv.

    timm builds it as an ``embed_layer`` (``in_chans`` is the id embedding's width)."""

    def __init__(self, *args, codebook_size: int, dropout: float = 0.1, **kwargs):
        kwargs["patch_size"] = 2
        super().__init__(*args, **kwargs)
        self.tokens = nn.Embedding(codebook_size, self.proj.in_channels)
        nn.init.normal_(self.tokens.weight, std=0.02)
        self.token_norm = nn.LayerNorm(self.proj.in_channels)
        self.token_drop = nn.Dropout(dropout)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_drop(self.token_norm(self.tokens(ids.long()))).permute(0, 3, 1, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(self.embed_ids(ids))


def truncated_normal(mean: float, std: float, low: float, high: float, generator: torch.Generator | None = None,
                     device=None) -> float:
    """One draw of N(mean, std) restricted to [low, high], by inverting the normal CDF."""
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
    lo, hi = normal.cdf(torch.tensor(low, dtype=torch.float64)), normal.cdf(torch.tensor(high, dtype=torch.float64))
    u = torch.rand((), generator=generator, device=device, dtype=torch.float64).cpu()
    return float(normal.icdf(lo + u * (hi - lo)).clamp(low, high))


def random_masks(batch: int, patches: int, ratio: float, drop_ratio: float, generator: torch.Generator | None = None,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked, dropped), both bool [B, N]: per sample the lowest ceil(N*ratio) of random scores are
    masked, the lowest ceil(N*drop_ratio) of those dropped. ``ratio >= drop_ratio``."""
    if not 0 <= drop_ratio <= ratio <= 1:
        raise ValueError(f"need 0 <= drop_ratio ({drop_ratio}) <= mask ratio ({ratio}) <= 1")
    rank = torch.rand(batch, patches, generator=generator, device=device).argsort(1).argsort(1)
    return rank < math.ceil(patches * ratio), rank < math.ceil(patches * drop_ratio)


class MaskedTokenModel(nn.Module):
    def __init__(self, *, codebook_size: int, grid: int, codebook_dim: int = 32, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, dropout: float = 0.1, decoder_dim: int = 512,
                 decoder_depth: int = 4, decoder_heads: int = 16, decoder_dropout: float = 0.1):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.patch_embed = IdPatchEmbed(img_size=grid, in_chans=codebook_dim, embed_dim=embed_dim,
                                        codebook_size=codebook_size, dropout=dropout)
        side = grid // 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed 2-D sin-cos positions with a zero cls slot (MAE/MAGE)
        self.register_buffer("pos_embed", torch.cat([torch.zeros(1, 1, embed_dim), sincos_pos(side, side, embed_dim)], 1))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                                      for _ in range(depth)])
        self.norm = LayerNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.decoder_pos = nn.Parameter(torch.zeros(1, 1 + side * side, decoder_dim))
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, proj_drop=decoder_dropout,
                  attn_drop=decoder_dropout, norm_layer=LayerNorm) for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_dim)
        # MlmLayer: per patch 2x2 token vectors -> GELU -> LN -> dot with the id embedding (+ bias)
        self.head = nn.Linear(decoder_dim, 4 * codebook_dim)
        self.head_norm = nn.LayerNorm(codebook_dim)
        self.head_bias = nn.Parameter(torch.zeros(codebook_size))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)
        self.apply(_init_linear)

    @property
    def grid(self) -> int:
        return self.config["grid"]

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "mask_token", "decoder_pos"}

    def encode(self, ids: torch.Tensor, masked: torch.Tensor, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder output [B, 1 + kept, E], kept patch indices [B, kept])."""
        x = self.patch_embed(ids)
        b, n, e = x.shape
        x = torch.where((masked & ~dropped)[..., None], self.mask_token.to(x.dtype).expand(b, n, e), x)
        x = x + self.pos_embed[:, 1:]
        kept = (n - int(dropped[0].sum())) if b else n
        # stable sort keeps the visible patches in raster order
        index = dropped.to(torch.uint8).argsort(dim=1, stable=True)[:, :kept]
        x = torch.gather(x, 1, index[..., None].expand(b, kept, e))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, 1, e)
        return self.norm(self.blocks(torch.cat([cls.to(x.dtype), x], 1))), index

    def decode(self, encoded: torch.Tensor, index: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Logits [B, H, W, K] over the ids of every token."""
        y = self.decoder_embed(encoded)
        b, n = masked.shape
        d = y.shape[-1]
        cls = y[:, :1].expand(b, n, d)
        full = cls.scatter(1, index[..., None].expand(-1, -1, d), y[:, 1:])
        full = torch.where(masked[..., None], cls, full)  # masked positions keep the cls-derived vector
        h = self.decoder_norm(self.decoder_blocks(torch.cat([y[:, :1], full], 1) + self.decoder_pos))[:, 1:]
        side = self.grid // 2
        t = self.head(h).view(b, side, side, 2, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, self.grid, self.grid, -1)
        t = self.head_norm(F.gelu(t))
        return t @ self.patch_embed.tokens.weight.detach().t() + self.head_bias

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """The encoder's mean patch output with nothing masked [B, E]: what embedding reads."""
        none = torch.zeros(ids.shape[0], (ids.shape[1] // 2) * (ids.shape[2] // 2), dtype=torch.bool, device=ids.device)
        return self.encode(ids, none, none)[0][:, 1:].mean(1)

    def forward(self, ids: torch.Tensor, masked: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        encoded, index = self.encode(ids, masked, dropped)
        return self.decode(encoded, index, masked)


def soft_targets(codebook: torch.Tensor, tau: float, neighbours: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Each code's ``neighbours`` nearest codes by cosine (itself first) and their weights
    softmax(cos / tau): ([K, m] ids, [K, m] weights). Neighbouring k-means codes of small patches
    are near-equivalent, so the exact id is a noisy target; this one shares credit among them."""
    c = F.normalize(codebook.float(), dim=1)
    cos, idx = (c @ c.T).topk(min(neighbours, len(c)), dim=1)
    return idx, torch.softmax(cos / tau, dim=1)


def masked_token_loss(logits: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor, smoothing: float = 0.0,
                      targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) over masked patches only: cross-entropy per token, averaged over each
    patch's 2x2 tokens, then over the masked patches. ``targets`` (from ``soft_targets``) replaces
    the one-hot id by a distribution over its nearest codes."""
    b, h, w, k = logits.shape
    if targets is not None:
        idx, weight = targets[0][ids.long()], targets[1][ids.long()]  # [b, h, w, m]
        ce = -(weight * torch.log_softmax(logits.float(), -1).gather(-1, idx)).sum(-1)
    else:
        ce = F.cross_entropy(logits.reshape(-1, k).float(), ids.reshape(-1).long(), reduction="none",
                             label_smoothing=smoothing).view(b, h, w)
    hit = (logits.argmax(-1) == ids).float()

    def per_patch(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, h // 2, 2, w // 2, 2).mean((2, 4)).reshape(b, -1)

    weight = masked.float()
    total = weight.sum().clamp_min(1)
    return (per_patch(ce) * weight).sum() / total, (per_patch(hit) * weight).sum() / total


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
