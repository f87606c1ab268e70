"""The training augmentation of one batch, in SeiT's order, on the device.

ids -> Token-EDA -> codebook lookup -> Token-RRC (or a plain random crop) -> Emb-Noise /
ColorAdapt -> CutMix / Mixup -> (embedding map, soft targets). With a TokenAdapt model, a share
of the batch (SeiT++: half) takes the TokenAdapt path instead of Token-RRC: f -> per-sample flip,
affine and RandomResizedCrop -> g -> argmax ids -> codebook lookup. Pixels take the same path
without the token-only steps (EDA, noise, ColorAdapt) and with a horizontal flip and timm's random
erasing: the DeiT baseline (its per-image RandAugment and repeated-augmentation sampler run in the
pixel loader, ``seit.data.image_datamodule``). Every draw comes from one ``torch.Generator`` that the
task seeds per step (random erasing's from a state seeded by it), so a batch's augmentation depends
only on (seed, rank, step) and a resumed run repeats it.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from timm.data.random_erasing import RandomErasing

from seit.augment.color import color_adapt, emb_noise
from seit.augment.crop import center_crop, random_crop
from seit.augment.eda import token_eda
from seit.augment.geo import GeoConfig, random_theta
from seit.augment.mix import mix_batch, smooth_one_hot
from seit.augment.rrc import token_rrc


@dataclass
class AugConfig:
    """``conf/aug/*.yaml`` as a typed object; every field defaults to off."""

    crop: int | None = None                  # output side; eval takes the center crop of this size
    hflip: float = 0.0                       # pixels only: a flipped token grid is not a flipped image
    rrc: dict = field(default_factory=lambda: {"enabled": False, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3]})
    eda: dict = field(default_factory=lambda: {"replace_prob": 0.0, "swap_prob": 0.0, "token_prob": 0.25,
                                               "swap_scale": 0.25})
    noise: dict = field(default_factory=lambda: {"prob": 0.0, "scale": 1.0, "std": 1.0, "relative": False})
    color_adapt: dict = field(default_factory=lambda: {"prob": 0.0, "eps": 1e-5})
    mix: dict = field(default_factory=lambda: {"cutmix_alpha": 0.0, "mixup_alpha": 0.0, "prob": 1.0,
                                               "switch_prob": 0.5})
    tokenadapt: dict = field(default_factory=lambda: {"checkpoint": None, "share": 0.5})
    # pixels only, DeiT (Touvron et al. 2021): RandAugment in the loader, random erasing here, repeated
    # augmentation as the loader's sampler
    auto_augment: str | None = None          # a timm policy string; DeiT: rand-m9-mstd0.5-inc1
    random_erasing: dict = field(default_factory=lambda: {"prob": 0.0, "mode": "pixel", "count": 1})
    repeated_aug: float = 1                  # copies of each drawn image per epoch; 1 = off, DeiT: 3

    @classmethod
    def from_dict(cls, cfg: dict) -> "AugConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown aug keys {unknown}; known: {sorted(known)}")
        out = cls()
        for name, value in cfg.items():
            default = getattr(out, name)
            if isinstance(default, dict):
                if value is not None and not hasattr(value, "keys"):
                    raise ValueError(f"aug.{name} takes keys {sorted(default)}, got {value!r}")
                bad = sorted(set(value or {}) - set(default))
                if bad:
                    raise ValueError(f"unknown aug.{name} keys {bad}; known: {sorted(default)}")
                value = {**default, **(value or {})}
            setattr(out, name, value)
        return out

    @property
    def mixes(self) -> bool:
        return self.mix["cutmix_alpha"] > 0 or self.mix["mixup_alpha"] > 0

    def pixel_only(self) -> list[str]:
        """The pixel-only augmentations this config turns on (``aug.`` keys): a token grid has no PIL
        image for RandAugment, no pixels to erase, and the token loader has no repeat sampler."""
        on = {"auto_augment": bool(self.auto_augment), "random_erasing.prob": self.random_erasing["prob"] > 0,
              "repeated_aug": self.repeated_aug != 1}
        return [name for name, is_on in on.items() if is_on]


def step_seed(seed: int, rank: int, step: int) -> int:
    """The augmentation seed of one training step: a function of (seed, rank, step) only."""
    return (seed * 1_000_003 + rank) * 1_000_000_007 + step


def color_choice(x: torch.Tensor, cfg: AugConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Per sample: noise (prob), ColorAdapt (prob) or nothing, SeiT++'s RandomChoice. With
    ColorAdapt off this is SeiT's noise on a random ``noise.prob`` share of the batch."""
    p_noise, p_color = cfg.noise["prob"], cfg.color_adapt["prob"]
    if p_noise + p_color > 1 + 1e-9:
        raise ValueError(f"aug.noise.prob + aug.color_adapt.prob = {p_noise + p_color} > 1")
    if p_noise <= 0 and p_color <= 0:
        return x
    u = torch.rand(x.shape[0], generator=generator, device=x.device)
    if p_noise > 0:
        # relative: in units of each channel's std over the batch, so one setting means one
        # signal-to-noise ratio per channel for any codebook. SeiT's absolute std 1 assumes its
        # codebook's scale; a PCA codebook (k-means) has channel stds from ~4 down to ~0.003.
        unit = x.std((0, 2, 3), keepdim=True) if cfg.noise["relative"] else 1.0
        x = emb_noise(x, u < p_noise, cfg.noise["scale"] * unit, cfg.noise["std"] * unit, generator)
    if p_color > 0:
        x = color_adapt(x, (u >= p_noise) & (u < p_noise + p_color), cfg.color_adapt["eps"])
    return x


def augment_tokens(ids: torch.Tensor, labels: torch.Tensor, embed, cfg: AugConfig, num_classes: int,
                   smoothing: float, synonyms: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, adapt=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch of ids [B,H,W] -> (embedding map [B,D,crop,crop], soft targets [B,C]).

    ``adapt``: a frozen ``TokenAdapt`` for the first ``tokenadapt.share`` of the batch."""
    e = cfg.eda
    if e["replace_prob"] > 0 or e["swap_prob"] > 0:
        ids = token_eda(ids, synonyms, e["replace_prob"], e["swap_prob"], e["token_prob"], e["swap_scale"], generator)
    n = round(ids.shape[0] * cfg.tokenadapt["share"]) if adapt is not None else 0
    x = spatial(embed(ids[n:]), cfg, generator)
    if n:
        geo = GeoConfig(scale=tuple(cfg.rrc["scale"]), ratio=tuple(cfg.rrc["ratio"]))
        theta = random_theta(n, geo, 2 * ids.shape[-1], generator, ids.device)
        x = torch.cat([embed(adapt.adapt(ids[:n], theta, x.shape[-1])), x])
    x = color_choice(x, cfg, generator)
    return mix(x, labels, cfg, num_classes, smoothing, generator)


def augment_pixels(images: torch.Tensor, labels: torch.Tensor, embed, cfg: AugConfig, num_classes: int,
                   smoothing: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel baseline: normalise -> RRC (or crop) -> flip -> random erasing -> CutMix / Mixup."""
    x = spatial(embed(images), cfg, generator)
    if cfg.hflip > 0:
        flip = torch.rand(x.shape[0], generator=generator, device=x.device) < cfg.hflip
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if cfg.random_erasing["prob"] > 0:
        x = random_erasing(x, cfg.random_erasing, generator)
    return mix(x, labels, cfg, num_classes, smoothing, generator)


def random_erasing(x: torch.Tensor, cfg: dict, generator: torch.Generator | None) -> torch.Tensor:
    """timm's ``RandomErasing`` (Zhong et al. 2020) on a normalised batch [B,C,H,W], in place: per sample
    with probability ``prob``, 1..``count`` boxes (2-33% of the area, aspect 0.3-3.3) filled per ``mode``
    ('pixel': N(0,1) per element, DeiT's; 'rand': per box and channel; 'const': zero, the mean).

    DeiT erases after RRC/flip and before Mixup/CutMix, per sample, as here. timm draws from python's
    ``random`` and torch's default RNG; both are seeded from ``generator``'s seed for this call and
    restored after, so the erasing repeats on resume like every other draw."""
    if cfg["mode"] not in ("pixel", "rand", "const"):
        raise ValueError(f"aug.random_erasing.mode={cfg['mode']!r}; timm knows pixel, rand, const")
    eraser = RandomErasing(float(cfg["prob"]), mode=cfg["mode"], max_count=int(cfg["count"]), device=x.device)
    if generator is None:
        return eraser(x)
    seed = random.Random(generator.initial_seed()).getrandbits(63)  # not the step generator's own Philox stream
    with global_rngs_seeded(seed, x.device):
        return eraser(x)


@contextmanager
def global_rngs_seeded(seed: int, device: torch.device):
    """Python's ``random`` and torch's default generators (CPU and ``device``) seeded with ``seed`` inside
    the block, and their states as before after it: a library that draws from the global RNGs
    becomes a function of ``seed`` without disturbing anyone else's draws."""
    python_state = random.getstate()
    forked = [device] if device.type != "cpu" else []
    try:
        with torch.random.fork_rng(devices=forked, device_type=device.type if forked else "cuda"):
            random.seed(seed)
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.default_generators[device.index or 0].manual_seed(seed)
            elif forked:
                torch.get_device_module(device.type).manual_seed(seed)
            yield
    finally:
        random.setstate(python_state)


def spatial(x: torch.Tensor, cfg: AugConfig, generator: torch.Generator | None) -> torch.Tensor:
    size = cfg.crop or x.shape[-1]
    if cfg.rrc["enabled"]:
        return token_rrc(x, size, cfg.rrc["scale"], cfg.rrc["ratio"], generator)
    return random_crop(x, size, generator) if size < x.shape[-1] else x


def mix(x: torch.Tensor, labels: torch.Tensor, cfg: AugConfig, num_classes: int, smoothing: float,
        generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not cfg.mixes:
        return x, smooth_one_hot(labels, num_classes, smoothing)
    m = cfg.mix
    return mix_batch(x, labels, num_classes, cutmix_alpha=m["cutmix_alpha"], mixup_alpha=m["mixup_alpha"],
                     prob=m["prob"], switch_prob=m["switch_prob"], smoothing=smoothing, generator=generator)


def eval_view(x: torch.Tensor, cfg: AugConfig) -> torch.Tensor:
    """The evaluation input: the center crop (SeiT: 28 of 32)."""
    return center_crop(x, cfg.crop) if cfg.crop and cfg.crop < x.shape[-1] else x
