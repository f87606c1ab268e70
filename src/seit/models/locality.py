"""The locality feed-forward: a depthwise 3x3 convolution on the token grid inside the ViT's MLP.

Irandoust et al., "Training a ViT from scratch in less than 24 hours with 1 GPU" (HITY @ NeurIPS
2022), after LocalViT (Li et al. 2021) with LayerNorm instead of BatchNorm
(``../shared/reference/curation-and-efficient-vit.md`` §6.2). A ViT has no notion of which patches
are neighbours; the 3x3 depthwise convolution gives every block that bias, which is what makes a
ViT learn fast from little data or time.

It plugs into timm's ``Block`` as ``mlp_layer`` (``model.mlp_layer=locality``), so the block's own
parts do the rest of the paper's branch: ``norm2`` is the LayerNorm before the first linear and
``drop_path2`` the drop-path on the branch. Per block::

    patches [B, N, d] --Linear(d, 4d, no bias)--> hard-swish --> [B, 4d, H, W]
      --depthwise Conv 3x3 (no bias)--> hard-swish --Linear(4d, d, no bias)--> [B, N, d]

Class and register tokens (the first ``N - H*W`` tokens) get a zero update, so the residual
passes them through unchanged, as the paper's block splits them off and concatenates them back.

The grid ``(H, W)`` comes from the patch embedding of the model the module sits in
(``track_grid`` registers a hook on it), so one model runs on every grid a curriculum or an
evaluation gives it, square or not. The hook and the modules share one ``PatchGrid`` object, so a
deep copy of the model (timm's model EMA) reads its own grid, not the original's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class LocalityMlp(nn.Module):
    """timm ``mlp_layer``: ``[B, N, d] -> [B, N, d]``, zero for the ``N - H*W`` leading (prefix) tokens.

    The patch grid ``(H, W)`` of the current input comes from ``grid_source`` (set by ``track_grid``);
    a module used on its own infers a square grid after ``num_prefix_tokens`` prefix tokens. ``bias`` and ``drop``
    (timm's Block passes them) are not used: the paper's linears have no bias and it has no dropout.
    Raises ValueError when the token count does not fit the grid.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer=None, norm_layer=None, bias: bool = True, drop: float = 0.0, kernel_size: int = 3,
                 num_prefix_tokens: int = 0, **factory):
        super().__init__()
        hidden = hidden_features or 4 * in_features
        self.fc1 = nn.Linear(in_features, hidden, bias=False, **factory)
        self.conv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False,
                              **factory)
        self.act = nn.Hardswish()
        self.fc2 = nn.Linear(hidden, out_features or in_features, bias=False, **factory)
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_source: PatchGrid | None = None

    def patch_grid(self, tokens: int) -> tuple[int, int]:
        if self.grid_source is not None and self.grid_source.grid is not None:
            h, w = self.grid_source.grid
            if h * w > tokens:
                raise ValueError(f"locality MLP: {tokens} tokens cannot hold the {h}x{w} patch grid")
            return h, w
        side = math.isqrt(max(0, tokens - self.num_prefix_tokens))
        if side * side + self.num_prefix_tokens != tokens:
            raise ValueError(f"locality MLP: {tokens} tokens with {self.num_prefix_tokens} prefix tokens are not a "
                             "square grid; use it in a model that reports its grid (track_grid)")
        return side, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, w = self.patch_grid(n)
        prefix = n - h * w
        y = self.act(self.fc1(x[:, prefix:]))  # [B, HW, 4d]
        y = y.transpose(1, 2).reshape(b, -1, h, w)
        y = self.act(self.conv(y)).flatten(2).transpose(1, 2)
        y = self.fc2(y)
        return torch.cat([y.new_zeros(b, prefix, y.shape[-1]), y], 1) if prefix else y


class PatchGrid:
    """A forward hook on a patch embedding that keeps the grid ``(H, W)`` of its latest output.

    The embedding gives ``[B, H, W, C]`` under ``dynamic_img_size`` (timm's NHWC output) and
    ``[B, N, C]`` on its fixed ``grid_size`` otherwise."""

    def __init__(self):
        self.grid: tuple[int, int] | None = None

    def __call__(self, embed: nn.Module, args, out: torch.Tensor) -> None:
        self.grid = tuple(out.shape[1:3]) if out.ndim == 4 else tuple(embed.grid_size)


def track_grid(vit: nn.Module) -> None:
    """Give every ``LocalityMlp`` of a timm ViT the patch grid of each input, from its ``patch_embed``
    (nothing is registered in a model without one)."""
    modules = [m for m in vit.modules() if isinstance(m, LocalityMlp)]
    if modules:
        source = PatchGrid()
        for module in modules:
            module.grid_source = source
        vit.patch_embed.register_forward_hook(source)
