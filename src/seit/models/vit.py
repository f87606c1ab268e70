"""Assemble a classifier: input embedding -> stem -> timm ViT blocks -> mean pool + LN + linear.

The transformer is timm's ``VisionTransformer``, configured through its injection points:
``embed_layer`` (the Stem-Adaptor for tokens, the stock patchify for pixels, unless the config
names another), ``block_fn``, ``mlp_layer`` and ``norm_layer``. A different block, MLP or norm is
a module plus a config (``model.mlp_layer: {_target_: ..., _partial_: true}``), not a fork;
``model.mlp_layer=locality`` is the locality feed-forward (``seit.models.locality``).
With ``dynamic_img_size`` (default) the position embedding is interpolated to the grid of each
batch, so one model trains and evaluates on any grid size. The head is SeiT's: global average
pooling, LayerNorm, linear (no class token, which SeiT prepends but never reads). Self-supervised
backbones (DINO, ``seit.models.dino``) take ``class_token=true``: features are then the final-norm
class token, and ``init_values`` turns on LayerScale (DINOv2: 1e-5).

Token input comes in two flavours. ``embedding=codebook`` (SeiT): the frozen codebook map goes
through the overlapping k4 s2 Stem-Adaptor. ``embedding=learned`` (SeiT++): the (augmented) map is
re-quantised to ids by cosine and read by a learned id embedding and a k2 s2 stem, the MTM
encoder's input layer, so a pre-trained encoder loads by name. Either way the augmentations
see the same codebook map.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn as nn
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer

from seit.models.input_embed import CodebookEmbedding, PixelNormalize
from seit.models.locality import LocalityMlp, track_grid
from seit.models.mtm import IdPatchEmbed
from seit.models.stem import StemAdaptor
from seit.utils.validate import locate

INPUTS = ("tokens", "pixels")
EMBEDDINGS = ("codebook", "learned")
NAMED_LAYERS = {"mlp_layer": {"mlp": Mlp, "locality": LocalityMlp}}  # short names a config may give


def layer(value: Callable | str | None, key: str, default: Callable | None = None) -> Callable | None:
    """An injection point's value: a callable (a class or a Hydra ``_partial_``), a short name of
    ``NAMED_LAYERS`` (``model.mlp_layer=locality``), a dotted import path, or None for ``default``
    (None: timm's own default). ``key`` names it in errors."""
    if value is None:
        return default
    if isinstance(value, str):
        named = NAMED_LAYERS.get(key, {})
        if value in named:
            return named[value]
        if "." not in value:
            known = f"one of {sorted(named)} or " if named else ""
            raise ValueError(f"model.{key}={value}: not a known name; give {known}a dotted import path")
        return locate(value, f"model.{key}")
    return value


class TokenViT(nn.Module):
    """``embed(x)`` gives the map the augmentations work on; ``forward(map)`` gives logits [B, num_classes].

    Inputs: ids [B, H, W] (tokens) or uint8 images [B, 3, H, W] (pixels), through ``embed``.
    """

    def __init__(self, *, input: str, input_size: int, num_classes: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 codebook_size: int = 0, codebook_dim: int = 32, patch_size: int = 16, embedding: str = "codebook",
                 token_dropout: float = 0.1, dynamic_img_size: bool = True, embed_layer: Callable | str | None = None,
                 block_fn: Callable | str | None = None, mlp_layer: Callable | str | None = None,
                 norm_layer: Callable | str | None = None, class_token: bool = False,
                 init_values: float | None = None):
        super().__init__()
        if input not in INPUTS:
            raise ValueError(f"model.input must be one of {INPUTS}, got {input!r}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"model.embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        self.requantize = input == "tokens" and embedding == "learned"
        if input == "tokens":
            if codebook_size <= 0:
                raise ValueError("a token model needs codebook_size > 0")
            self.embed = CodebookEmbedding(codebook_size, codebook_dim)
            default_embed, patch = StemAdaptor, 2
            if self.requantize:
                default_embed = partial(IdPatchEmbed, codebook_size=codebook_size, dropout=token_dropout)
        else:
            self.embed = PixelNormalize()
            default_embed, patch = PatchEmbed, patch_size
        if input_size < patch:
            raise ValueError(f"input size {input_size} is smaller than the stem's stride {patch}")
        self.vit = VisionTransformer(
            img_size=input_size, patch_size=patch, in_chans=self.embed.out_chans, num_classes=num_classes,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
            class_token=class_token, global_pool="token" if class_token else "avg", fc_norm=not class_token,
            init_values=init_values, drop_path_rate=drop_path_rate,
            dynamic_img_size=dynamic_img_size, embed_layer=layer(embed_layer, "embed_layer", default_embed),
            block_fn=layer(block_fn, "block_fn", Block), mlp_layer=layer(mlp_layer, "mlp_layer", Mlp),
            norm_layer=layer(norm_layer, "norm_layer"))
        track_grid(self.vit)  # a locality MLP needs each input's patch grid

    def no_weight_decay(self) -> set[str]:
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def body_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed.nearest(x) if self.requantize else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(self.body_input(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised features [B, embed_dim] (pre-logits): what embedding and probing tasks read."""
        return self.vit.forward_head(self.vit.forward_features(self.body_input(x)), pre_logits=True)
