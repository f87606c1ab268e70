"""What turns a batch into a ``[B, C, H, W]`` map that the ViT stem consumes.

Tokens: a frozen codebook lookup (SeiT keeps the tokenizer's codebook fixed), so every
augmentation can work on the D-channel embedding map. Pixels: uint8 images normalised with the
ImageNet statistics, for the pixel baseline that shares the rest of the code path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seit.data.dataset_info import codebook_fingerprint
from seit.utils.nearest import DEFAULT_CHUNK, nearest_code

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CodebookEmbedding(nn.Module):
    """ids [B,H,W] (any integer dtype, uint16 from the loader) -> [B,D,H,W]; the codebook is frozen."""

    def __init__(self, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.register_buffer("codebook", torch.zeros(codebook_size, codebook_dim))

    @property
    def out_chans(self) -> int:
        return self.codebook.shape[1]

    @property
    def fingerprint(self) -> str:
        return codebook_fingerprint(self.codebook)

    def load_codebook(self, codebook: torch.Tensor) -> None:
        if codebook.shape != self.codebook.shape:
            raise ValueError(f"codebook shape {tuple(codebook.shape)} does not match the model's "
                             f"{tuple(self.codebook.shape)} (model.codebook_size / codebook_dim)")
        self.codebook.copy_(codebook)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.long(), self.codebook).permute(0, 3, 1, 2)

    def nearest(self, x: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
        """[B,D,H,W] map -> ids [B,H,W] of the nearest codebook rows by cosine (SeiT++'s re-quantisation
        of augmented maps; an identity on clean lookups). ``chunk`` bounds the score entries
        (tokens x K) held at once (see ``nearest_code``)."""
        b, d, h, w = x.shape
        unit = F.normalize(x.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, d)
        code = F.normalize(self.codebook.float(), dim=1)
        return nearest_code(unit, code, metric="ip", chunk=chunk).reshape(b, h, w)


class PixelNormalize(nn.Module):
    """uint8 images [B,3,H,W] -> normalised float."""

    out_chans = 3

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std
