"""TokenAdapt (SeiT++ §F2): tokens <-> a "pixel-like" map on which pixel geometry makes sense.

A geometric augmentation applied straight to a token grid moves codes, but a code describes a
patch's content, so rotated, sheared or resampled grids hold codes no tokenizer would produce.
TokenAdapt learns a forward converter f (codebook map -> a 2x upsampled feature map) and an
inverse g (feature map -> logits over the ids at half its resolution), trained so that
``g(A(f(T(x))))`` predicts ``T(A(x))`` for random geometric augmentations A
(``seit.tasks.tokenadapt``). Frozen, it turns a batch of ids into augmented ids.

Sizes follow the reference: width 384, 6 heads, one pre-norm transformer block each way with a
Tanh MLP and fixed 2-D sin-cos positions (about 2M parameters per direction). One addition of
ours: both directions are residual around the codebook. f adds the nearest-upsampled codebook
map to its output and g adds the cosine of each 2x2-pooled cell to every code to its logits, so
the untrained converter already behaves like a (bilinear) warp of the grid and training only has
to learn the correction; without it, three CPU epochs left TokenAdapt below the naive warp.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block


def sincos_pos(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos positions [1, h*w, dim], row-major (shared with the MTM encoder)."""
    return build_sincos2d_pos_embed([h, w], dim, device=device)[None]  # [1, h*w, dim], row-major


class ForwardConverter(nn.Module):
    """[B, D, H, W] codebook map -> [B, D, 2H, 2W] feature map."""

    def __init__(self, codebook_dim: int, width: int = 384, heads: int = 6, mlp_ratio: float = 4.0):
        super().__init__()
        self.proj = nn.Linear(codebook_dim, width)
        self.block = Block(width, heads, mlp_ratio, qkv_bias=True, act_layer=nn.Tanh)
        self.up = nn.ConvTranspose2d(width, codebook_dim, 2, stride=2)
        nn.init.zeros_(self.up.weight)  # starts as the skip alone: a plain upsampling of the codebook map
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        t = self.proj(x.flatten(2).transpose(1, 2))
        t = self.block(t + sincos_pos(h, w, t.shape[-1], x.device))
        return self.up(t.transpose(1, 2).reshape(b, -1, h, w)) + F.interpolate(x, scale_factor=2, mode="nearest")


class InverseConverter(nn.Module):
    """[B, D, h, w] feature map -> [B, K, h/2, w/2] logits over the ids."""

    def __init__(self, codebook: torch.Tensor, width: int = 384, heads: int = 6, mlp_ratio: float = 4.0):
        super().__init__()
        codebook_size, codebook_dim = codebook.shape
        self.register_buffer("unit_codebook", F.normalize(codebook.float(), dim=1), persistent=False)
        self.skip_scale = nn.Parameter(torch.tensor(10.0))  # logit scale of the cosine skip
        self.down = nn.Conv2d(codebook_dim, width, 2, stride=2)
        self.block = Block(width, heads, mlp_ratio, qkv_bias=True, act_layer=nn.Tanh)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, codebook_size)
        nn.init.zeros_(self.head.weight)  # starts as the cosine skip alone: a nearest-code lookup
        nn.init.zeros_(self.head.bias)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        t = self.down(m)
        b, _, h, w = t.shape
        t = t.flatten(2).transpose(1, 2)
        t = self.head(self.norm(self.block(t + sincos_pos(h, w, t.shape[-1], m.device))))
        cosine = torch.einsum("bdhw,kd->bkhw", F.normalize(F.avg_pool2d(m, 2), dim=1), self.unit_codebook)
        return t.transpose(1, 2).reshape(b, -1, h, w) + self.skip_scale * cosine


class TokenAdapt(nn.Module):
    """f and g around a frozen codebook; ``config`` rebuilds it from a saved file."""

    def __init__(self, codebook: torch.Tensor, width: int = 384, heads: int = 6, mlp_ratio: float = 4.0):
        super().__init__()
        k, d = codebook.shape
        self.config = {"codebook_size": k, "codebook_dim": d, "width": width, "heads": heads, "mlp_ratio": mlp_ratio}
        self.register_buffer("codebook", codebook.float().clone())
        self.f = ForwardConverter(d, width, heads, mlp_ratio)
        self.g = InverseConverter(self.codebook, width, heads, mlp_ratio)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codebook[ids.long()].permute(0, 3, 1, 2)

    def logits(self, ids: torch.Tensor, theta: torch.Tensor, out: int) -> torch.Tensor:
        """ids [B,H,W] -> logits [B,K,out,out] of the ids of the image warped by theta."""
        from seit.augment.geo import warp

        return self.g(warp(self.f(self.embed(ids)), theta, 2 * out))

    @torch.no_grad()
    def adapt(self, ids: torch.Tensor, theta: torch.Tensor, out: int) -> torch.Tensor:
        """The augmented ids [B,out,out] (argmax of g, as SeiT++ does)."""
        return self.logits(ids, theta, out).argmax(1)
