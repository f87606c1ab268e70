"""A VQGAN-style tokenizer: encoder -> cosine vector quantiser -> decoder.

Two architectures. ``arch="conv"`` is the VQGAN pyramid: downsampling 2**(len(ch_mult)-1), so
ch_mult of 4 levels gives 8, i.e. a 32x32 grid at 256 px as in SeiT. ``arch="patch"`` works at
the token grid, as ViT-VQGAN does: pixel-unshuffle ``patch`` x ``patch`` blocks, residual conv
blocks of ``width`` channels over the grid, and back through a pixel shuffle plus one small
full-resolution refinement that smooths the block seams. Nearly all of its compute runs at
1/patch resolution, so for the same cost it can be several times wider, which is what a
CPU-trained tokenizer needs.

The lookup is l2-normalised (cosine), as in ViT-VQGAN: codes live on the unit sphere,
which keeps them all in use and makes the codebook a well-scaled embedding for the ViT.
The codebook learns by EMA of the assigned (normalised) encoder outputs, and codes whose EMA
usage falls below ``dead_threshold`` times the uniform share 1/K are restarted at random encoder
outputs of the current batch. Usage starts at zero, so the first training step restarts every
code: the codebook starts on the data. A restarted code gets twice the threshold as its usage,
which at decay 0.99 gives it about 70 steps to win some tokens before it is restarted again;
without this, a short CPU run ended its first epoch with 109 of 512 codes in use.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seit.utils.nearest import nearest_code


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) or 1, ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                  _norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, codebook_dim: int):
        super().__init__()
        layers, cin = [nn.Conv2d(3, ch, 3, padding=1)], ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(cin, ch * mult))
                cin = ch * mult
            if level < len(ch_mult) - 1:
                layers.append(nn.Conv2d(cin, cin, 4, stride=2, padding=1))
        layers += [ResBlock(cin, cin), _norm(cin), nn.SiLU(), nn.Conv2d(cin, codebook_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, codebook_dim: int):
        super().__init__()
        cin = ch * ch_mult[-1]
        layers = [nn.Conv2d(codebook_dim, cin, 3, padding=1), ResBlock(cin, cin)]
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(cin, ch * mult))
                cin = ch * mult
            if level > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cin, 3, padding=1)]
        layers += [_norm(cin), nn.SiLU(), nn.Conv2d(cin, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class PatchEncoder(nn.Module):
    def __init__(self, patch: int, width: int, depth: int, codebook_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.PixelUnshuffle(patch), nn.Conv2d(3 * patch * patch, width, 1),
                                 *[ResBlock(width, width) for _ in range(depth)],
                                 _norm(width), nn.SiLU(), nn.Conv2d(width, codebook_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchDecoder(nn.Module):
    def __init__(self, patch: int, width: int, depth: int, codebook_dim: int, refine_ch: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(codebook_dim, width, 3, padding=1),
                                 *[ResBlock(width, width) for _ in range(depth)],
                                 _norm(width), nn.SiLU(), nn.Conv2d(width, 3 * patch * patch, 1),
                                 nn.PixelShuffle(patch))
        self.refine = nn.Sequential(nn.Conv2d(3, refine_ch, 3, padding=1), nn.SiLU(),
                                    nn.Conv2d(refine_ch, 3, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.net(z)
        return x + self.refine(x)


ARCHS = {"conv": (("ch", "ch_mult", "num_res_blocks"), Encoder, Decoder),
         "patch": (("patch", "width", "depth"), PatchEncoder, PatchDecoder)}


class CosineQuantizer(nn.Module):
    """Nearest unit-norm code by cosine; EMA codebook updates; dead-code restarts."""

    def __init__(self, codebook_size: int, codebook_dim: int, decay: float = 0.99, dead_threshold: float = 0.03,
                 beta: float = 0.25):
        super().__init__()
        self.decay, self.dead_threshold, self.beta = decay, dead_threshold, beta
        self.register_buffer("embed", F.normalize(torch.randn(codebook_size, codebook_dim), dim=1))
        self.register_buffer("usage", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", self.embed.clone())

    @property
    def codebook(self) -> torch.Tensor:
        return self.embed

    def lookup(self, z: torch.Tensor, copy_margin: float = 0.0) -> torch.Tensor:
        """[B,D,H,W] encoder output -> ids [B,H,W]: the nearest code by cosine.

        ``copy_margin`` > 0 makes the lookup rate-aware: in raster order a token takes its up
        (else its left) neighbour's code whenever that code's cosine is within the margin of the
        best one. Repeated neighbours are what the entropy coder stores almost for free, so a
        small margin buys many bytes for little reconstruction error (experiments/RESULTS.md).
        """
        b, d, h, w = z.shape
        z_unit = F.normalize(z, dim=1).permute(0, 2, 3, 1)  # [B,H,W,D]; embed rows are unit already
        if copy_margin <= 0:
            return nearest_code(z_unit.reshape(-1, d), self.embed, metric="ip").reshape(b, h, w)
        ids, best = nearest_code(z_unit.reshape(-1, d), self.embed, metric="ip", with_scores=True)
        ids, floor = ids.reshape(b, h, w), best.reshape(b, h, w) - copy_margin
        for i in range(h):  # rows depend on the row above, tokens on their left one
            row_sims = (z_unit[:, i].reshape(-1, d) @ self.embed.T).reshape(b, w, -1)  # one row's [B,W,K]
            row = ids[:, i]
            if i > 0:
                up = ids[:, i - 1]
                row = torch.where(row_sims.gather(-1, up[..., None])[..., 0] >= floor[:, i], up, row)
                took_up = row == up
            else:
                took_up = torch.zeros_like(row, dtype=torch.bool)
            for j in range(1, w):
                left = row[:, j - 1]
                take = ~took_up[:, j] & (row_sims[:, j].gather(-1, left[:, None])[:, 0] >= floor[:, i, j])
                row[:, j] = torch.where(take, left, row[:, j])
            ids[:, i] = row
        return ids

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        z_unit = F.normalize(z, dim=1)
        ids = self.lookup(z)
        q = self.embed_ids(ids)
        commit = self.beta * F.mse_loss(z_unit, q.detach())
        if self.training:
            self._ema_update(z_unit.detach(), ids)
        counts = torch.bincount(ids.reshape(-1), minlength=self.embed.shape[0]).float()
        probs = counts / counts.sum()
        stats = {"perplexity": torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum()),
                 "usage": (counts > 0).float().mean()}
        return z_unit + (q - z_unit).detach(), ids, {"commit": commit, **stats}

    @torch.no_grad()
    def _ema_update(self, z_unit: torch.Tensor, ids: torch.Tensor) -> None:
        flat = z_unit.permute(0, 2, 3, 1).reshape(-1, z_unit.shape[1])
        onehot_sum = torch.zeros_like(self.embed_sum).index_add_(0, ids.reshape(-1), flat)
        counts = torch.bincount(ids.reshape(-1), minlength=self.embed.shape[0]).float()
        self.usage.mul_(self.decay).add_(counts / counts.sum(), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot_sum, alpha=1 - self.decay)
        self.embed.copy_(F.normalize(self.embed_sum, dim=1))
        dead = self.usage < self.dead_threshold / self.embed.shape[0]
        if dead.any():
            picks = flat[torch.randint(0, flat.shape[0], (int(dead.sum()),), device=flat.device)]
            self.embed[dead] = picks
            self.embed_sum[dead] = picks
            self.usage[dead] = 2 * self.dead_threshold / self.embed.shape[0]


class VQModel(nn.Module):
    def __init__(self, arch: str = "conv", codebook_size: int = 1024, codebook_dim: int | None = None,
                 decay: float = 0.99, dead_threshold: float = 0.03, beta: float = 0.25, **arch_args):
        """``arch_args``: ch, ch_mult, num_res_blocks for "conv"; patch, width, depth (and refine_ch) for "patch".
        ``codebook_dim``: the codebook's width D (default 32); ``embed_dim``, its name in tokenizers saved (and
        tokenizer training checkpoints written) before the rename, is read as it."""
        super().__init__()
        legacy = arch_args.pop("embed_dim", None)
        codebook_dim = int(codebook_dim if codebook_dim is not None else legacy if legacy is not None else 32)
        if arch not in ARCHS:
            raise ValueError(f"unknown VQ arch {arch!r}: choose one of {sorted(ARCHS)}")
        names, encoder_cls, decoder_cls = ARCHS[arch]
        extra = {"refine_ch"} if arch == "patch" else set()
        missing = [n for n in names if n not in arch_args]
        unknown = sorted(set(arch_args) - set(names) - extra)
        if missing or unknown:
            raise ValueError(f"VQ arch {arch!r} takes {list(names) + sorted(extra)}: "
                             f"missing {missing}, unknown {unknown}")
        args = {n: arch_args[n] for n in names}
        if arch == "conv":
            args["ch_mult"] = list(args["ch_mult"])
            self.downsample = 2 ** (len(args["ch_mult"]) - 1)
            dec_args = args
        else:
            self.downsample = int(args["patch"])
            dec_args = {**args, "refine_ch": int(arch_args.get("refine_ch", 16))}
        self.config = {"arch": arch, **dec_args, "codebook_size": codebook_size, "codebook_dim": codebook_dim}
        self.encoder = encoder_cls(**args, codebook_dim=codebook_dim)
        self.quantizer = CosineQuantizer(codebook_size, codebook_dim, decay, dead_threshold, beta)
        self.decoder = decoder_cls(**dec_args, codebook_dim=codebook_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """images in [0,1] -> (reconstruction in [0,1] scale, ids, quantiser stats and losses)."""
        z_q, ids, stats = self.quantizer(self.encoder(images * 2 - 1))
        return (self.decoder(z_q) + 1) / 2, ids, stats

    def encode(self, images: torch.Tensor, copy_margin: float = 0.0) -> torch.Tensor:
        z = self.encoder(images * 2 - 1)
        with torch.autocast(z.device.type, enabled=False):  # under bf16 autocast the code search stays fp32
            return self.quantizer.lookup(z.float(), copy_margin)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return ((self.decoder(self.quantizer.embed_ids(ids)) + 1) / 2).clamp(0, 1)
