"""The Stem-Adaptor: SeiT's replacement for the ViT patchify.

SeiT feeds the 28x28x32 embedding map to a ViT through one overlapping
Conv2d(D -> width, kernel 4, stride 2, padding 1), giving a 14x14 token grid. It plugs into
timm's ``VisionTransformer`` through ``embed_layer`` (created with ``patch_size=2``), so the
transformer body stays stock timm. For any grid n the output is floor(n/2) per side, which is
what timm's PatchEmbed bookkeeping with patch 2 expects; under ``dynamic_img_size`` any grid,
odd ones included, is taken (the padded conv needs no divisibility).
"""

from __future__ import annotations

import torch.nn as nn
from timm.layers import Format, PatchEmbed
from timm.layers.format import nchw_to


class StemAdaptor(PatchEmbed):
    def __init__(self, *args, **kwargs):
        kwargs["patch_size"] = 2
        super().__init__(*args, **kwargs)
        self.proj = nn.Conv2d(self.proj.in_channels, self.proj.out_channels, kernel_size=4, stride=2, padding=1,
                              bias=self.proj.bias is not None)

    def forward(self, x):
        if self.strict_img_size:
            return super().forward(x)
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2) if self.flatten else x if self.output_fmt == Format.NCHW else nchw_to(x, self.output_fmt)
        return self.norm(x)
