"""Codebook compaction and synonyms.

Compaction drops the codes a tokenizer never emits on its training images and renumbers the
rest (SeiT's ViT-VQGAN used 391 of 8192). Fewer symbols mean fewer bits per token and a smaller
embedding, and the nearest-code encoding of every image seen is unchanged. The old -> new map
is kept with the tokenizer.

Synonyms are each code's k nearest other codes by cosine similarity, the table Token-EDA's
synonym replacement samples from. It is stored with the dataset as uint16 [K, k], nearest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compaction_map(counts: torch.Tensor) -> torch.Tensor:
    """old id -> new id (-1 for dropped codes), keeping the used codes in their old order."""
    used = counts > 0
    mapping = torch.full((counts.numel(),), -1, dtype=torch.long)
    mapping[used] = torch.arange(int(used.sum()))
    return mapping


def synonyms(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """[K, k] ids of each code's k most cosine-similar other codes, nearest first."""
    if not 0 < k < codebook.shape[0]:
        raise ValueError(f"synonym count k={k} must be in 1..{codebook.shape[0] - 1}")
    unit = F.normalize(codebook.float(), dim=1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices
