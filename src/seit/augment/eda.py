"""Token-EDA (SeiT): per sample, one of synonym replacement, square swap or nothing.

Both work on the id grid before the codebook lookup, batched: no loop over tokens or samples
(the reference replaces synonyms with a Python loop over 1,024 tokens per image, on the CPU).
"""

from __future__ import annotations

import torch


def synonym_replace(ids: torch.Tensor, synonyms: torch.Tensor, token_prob: float, apply: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """In the samples where ``apply`` [B] is set, each token with probability token_prob becomes
    one of its synonyms (a uniform pick from the table's k columns, nearest codes first)."""
    ids = ids.long()
    pick = torch.randint(0, synonyms.shape[1], ids.shape, generator=generator, device=ids.device)
    replaced = synonyms[ids, pick]
    hit = (torch.rand(ids.shape, generator=generator, device=ids.device) < token_prob) & apply[:, None, None]
    return torch.where(hit, replaced, ids)


def square_swap(ids: torch.Tensor, max_scale: float, apply: torch.Tensor,
                generator: torch.Generator | None = None, tries: int = 16) -> torch.Tensor:
    """Swap two s x s squares of the grid, s = floor(H * U(0, max_scale)), in the samples where
    ``apply`` is set. As in SeiT the two corners are drawn until they are more than s apart
    (Euclidean) and, here, until the squares do not overlap, so the result is a permutation of
    the grid; a sample with no such draw among ``tries`` is left as is."""
    ids = ids.long()
    b, h, w = ids.shape
    dev = ids.device
    side = torch.floor(h * max_scale * torch.rand(b, generator=generator, device=dev)).long()
    span = (torch.minimum(torch.tensor(h, device=dev), torch.tensor(w, device=dev)) - side).clamp_min(1)
    corners = (torch.rand(b, tries, 4, generator=generator, device=dev) * span[:, None, None]).long()
    dr_all, dc_all = corners[..., 0] - corners[..., 2], corners[..., 1] - corners[..., 3]
    s2 = side[:, None]
    # SeiT's test (Euclidean distance > s) lets diagonal squares overlap; also require that they don't
    far = (dr_all ** 2 + dc_all ** 2 > s2 ** 2) & ((dr_all.abs() >= s2) | (dc_all.abs() >= s2))
    ok = far.any(1) & apply & (side > 0)
    c = corners.gather(1, far.float().argmax(1)[:, None, None].expand(b, 1, 4))[:, 0]
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)

    def inside(top, left):  # [B, H, W] mask of the square at (top, left)
        r = (rows[None] >= top[:, None]) & (rows[None] < (top + side)[:, None])
        q = (cols[None] >= left[:, None]) & (cols[None] < (left + side)[:, None])
        return r[:, :, None] & q[:, None, :] & ok[:, None, None]

    in_a, in_b = inside(c[:, 0], c[:, 1]), inside(c[:, 2], c[:, 3])
    # source coordinates: a cell of square a reads the matching cell of square b, and back
    dr, dc = (c[:, 2] - c[:, 0])[:, None, None], (c[:, 3] - c[:, 1])[:, None, None]
    src_r = rows[None, :, None] + torch.where(in_a, dr, torch.where(in_b, -dr, 0))
    src_c = cols[None, None, :] + torch.where(in_a, dc, torch.where(in_b, -dc, 0))
    batch = torch.arange(b, device=dev)[:, None, None]
    return ids[batch, src_r, src_c]


def token_eda(ids: torch.Tensor, synonyms: torch.Tensor | None, replace_prob: float, swap_prob: float,
              token_prob: float, swap_scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """SeiT's RandomChoice per sample: replace (replace_prob), swap (swap_prob), else identity."""
    u = torch.rand(ids.shape[0], generator=generator, device=ids.device)
    replace, swap = u < replace_prob, (u >= replace_prob) & (u < replace_prob + swap_prob)
    out = ids.long()
    if replace_prob > 0:
        if synonyms is None:
            raise ValueError("Token-EDA synonym replacement needs the dataset's synonym table "
                             "(tokenize with data.build.synonyms_k > 0)")
        out = synonym_replace(out, synonyms.to(ids.device), token_prob, replace, generator)
    if swap_prob > 0:
        out = square_swap(out, swap_scale, swap, generator)
    return out
