"""VQGAN tokenizers from the taming-transformers codebase (Esser, Rombach & Ommer, CVPR 2021).

The modules here re-implement the published encoder / decoder / vector-quantizer layout of
taming's ``VQModel`` with the same parameter names, so the state dict of an original checkpoint
loads with ``strict=True``:

    encoder.conv_in, encoder.down.<i>.block.<j>.{norm1,conv1,norm2,conv2,nin_shortcut},
    encoder.down.<i>.attn.<j>.{norm,q,k,v,proj_out}, encoder.down.<i>.downsample.conv,
    encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out,
    quant_conv, quantize.embedding, post_quant_conv,
    decoder.conv_in, decoder.mid.*, decoder.up.<i>.block.<j>.*, decoder.up.<i>.attn.<j>.*,
    decoder.up.<i>.upsample.conv, decoder.norm_out, decoder.conv_out

Training checkpoints also carry ``loss.*`` (discriminator + LPIPS) weights; inference drops them.

Use::

    tok = from_taming_checkpoint("vqgan_imagenet_f16_1024/last.ckpt", cfg)   # cfg: conf/tokenizer/taming_vqgan.yaml
    tok.save("vqgan_f16_1024.tokenizer.safetensors")   # self-contained; seit.tokenizers.load_tokenizer reopens it

Everything is read from local files; nothing here touches the network.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from seit.tokenizers.base import Tokenizer, encode_device
from seit.utils.io import atomic_save_tensors
from seit.utils.nearest import nearest_code

log = logging.getLogger(__name__)

_GROUPS = 32  # taming's Normalize(): GroupNorm(32, C, eps=1e-6, affine=True)

# The architecture fields (taming's ``ddconfig`` + ``n_embed``/``embed_dim``) and seit's extras. taming's
# ``embed_dim`` (the codebook width D) is seit's ``codebook_dim``: taming_config reads either name.
_REQUIRED = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "n_embed", "codebook_dim")
_DEFAULTS = {"in_channels": 3, "out_ch": 3, "resolution": 256, "double_z": False, "dropout": 0.0,
             "image_size": None, "l2_normalized": False}
ARCH_FIELDS = _REQUIRED + tuple(_DEFAULTS)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

def taming_config(cfg: Mapping) -> dict:
    """Normalize a config into the plain dict the model is built from (and saved as JSON).

    Accepts seit's flat ``conf/tokenizer/taming_vqgan.yaml`` (extra keys such as ``kind`` and
    ``checkpoint`` are ignored), or taming's own layout (``model.params`` with a nested ``ddconfig``).
    Works with plain dicts and OmegaConf nodes. taming's ``embed_dim`` (also the key in tokenizer
    files saved before seit renamed it) is read as ``codebook_dim``.
    """
    cfg = _plain(cfg)
    if "model" in cfg and isinstance(cfg["model"], dict):  # a whole taming yaml
        cfg = cfg["model"]
    if "params" in cfg and isinstance(cfg["params"], dict):
        cfg = {**cfg, **cfg["params"]}
    if "ddconfig" in cfg and isinstance(cfg["ddconfig"], dict):
        cfg = {**cfg, **cfg["ddconfig"]}
    if cfg.get("codebook_dim") is None and cfg.get("embed_dim") is not None:
        cfg = {**cfg, "codebook_dim": cfg["embed_dim"]}
    missing = [k for k in _REQUIRED if cfg.get(k) is None]
    if missing:
        raise ValueError(f"taming VQGAN config lacks {missing}; see conf/tokenizer/taming_vqgan.yaml")
    out = {k: cfg.get(k, _DEFAULTS.get(k)) for k in ARCH_FIELDS}
    for k in ("ch", "num_res_blocks", "z_channels", "n_embed", "codebook_dim", "in_channels", "out_ch", "resolution"):
        out[k] = int(out[k])
    out["ch_mult"] = [int(m) for m in out["ch_mult"]]
    out["attn_resolutions"] = [int(r) for r in out["attn_resolutions"]]
    out["double_z"] = bool(out["double_z"])
    out["dropout"] = float(out["dropout"])
    out["l2_normalized"] = bool(out["l2_normalized"])
    out["image_size"] = int(out["image_size"] if out["image_size"] is not None else out["resolution"])
    if not out["ch_mult"]:
        raise ValueError("taming VQGAN config: ch_mult must not be empty")
    if out["double_z"]:
        raise ValueError("taming VQGAN config: double_z=True is the KL-autoencoder layout; a VQModel has "
                         "double_z=False (its quant_conv takes z_channels inputs)")
    widths = sorted({out["ch"] * m for m in out["ch_mult"]})
    if any(w % _GROUPS for w in widths):
        raise ValueError(f"taming VQGAN config: every width ch*ch_mult ({widths}) must be a multiple of 32 "
                         "(the GroupNorm group count)")
    down = 2 ** (len(out["ch_mult"]) - 1)
    if out["image_size"] % down:
        raise ValueError(f"taming VQGAN config: image_size {out['image_size']} is not a multiple of the "
                         f"downsampling factor {down} (from ch_mult {out['ch_mult']})")
    return out


def _plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            out = {}
            for key in cfg:
                try:
                    value = cfg[key]
                except Exception:  # an interpolation into a config this node is not part of: not an architecture key
                    continue
                out[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
            return {k: (_plain(v) if isinstance(v, Mapping) else v) for k, v in out.items()}
    except ImportError:  # pragma: no cover - omegaconf is a dependency, but keep this module standalone
        pass
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a mapping for the taming VQGAN config, got {type(cfg).__name__}")
    return {k: (_plain(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}


# --------------------------------------------------------------------------------------------
# building blocks (same names and layout as taming/modules/diffusionmodules/model.py)
# --------------------------------------------------------------------------------------------

def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=_GROUPS, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm-swish-conv3x3 twice, plus a 1x1 ``nin_shortcut`` when the width changes (no time embedding)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out and a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)  # [B, N, C]
        k = self.k(h).reshape(b, c, hh * ww)  # [B, C, N]
        v = self.v(h).reshape(b, c, hh * ww)  # [B, C, N]
        attn = torch.softmax(torch.bmm(q, k) * (c ** -0.5), dim=2)  # [B, Nq, Nk]
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, hh, ww)  # out[:, :, i] = sum_j attn[i, j] v[:, j]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv (taming's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` / ``attn`` lists and an optional down/upsample (taming's nn.Module())."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult, num_res_blocks: int, attn_resolutions, in_channels: int,
                 resolution: int, z_channels: int, dropout: float = 0.0, **_):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1, *ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(self.num_resolutions):
            level = _Level()
            block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
            for _j in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult, num_res_blocks: int, attn_resolutions, out_ch: int,
                 resolution: int, z_channels: int, dropout: float = 0.0, **_):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _Mid(block_in, dropout)
        levels: list[_Level] = []
        for i in reversed(range(self.num_resolutions)):
            level = _Level()
            block_out = ch * ch_mult[i]
            for _j in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)  # up[i] is the level at resolution index i, as in taming
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(self.num_resolutions)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Holds ``embedding`` (n_embed x codebook_dim); inference only: nearest code by L2 (or cosine)."""

    def __init__(self, n_embed: int, codebook_dim: int, l2_normalized: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, codebook_dim)
        self.l2_normalized = l2_normalized

    def codes(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.l2_normalized else w

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z: [N, D] -> ids [N] (argmin ||z - e||^2; with l2_normalized, of the normalised z and codes)."""
        if self.l2_normalized:
            z = F.normalize(z, dim=1)
        return nearest_code(z, self.codes(), metric="l2")


class TamingVQGAN(nn.Module):
    """taming's ``VQModel`` for inference: same submodule names, so its state dict loads strictly."""

    def __init__(self, config: Mapping):
        super().__init__()
        self.config = taming_config(config)
        c = self.config
        self.encoder = Encoder(**c)
        self.decoder = Decoder(**c)
        self.quantize = VectorQuantizer(c["n_embed"], c["codebook_dim"], c["l2_normalized"])
        self.quant_conv = nn.Conv2d(c["z_channels"], c["codebook_dim"], 1)
        self.post_quant_conv = nn.Conv2d(c["codebook_dim"], c["z_channels"], 1)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config["ch_mult"]) - 1)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1], [B,3,H,W] -> pre-quantization latents [B, codebook_dim, H/f, W/f]."""
        return self.quant_conv(self.encoder(x))

    def encode_ids(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1] -> code ids [B, H/f, W/f]."""
        h = self.encode_latents(x)
        b, d, gh, gw = h.shape
        with torch.autocast(h.device.type, enabled=False):  # under bf16 autocast the code search stays fp32
            ids = self.quantize.nearest(h.float().permute(0, 2, 3, 1).reshape(-1, d))
        return ids.reshape(b, gh, gw)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> images in (about) [-1, 1]."""
        quant = F.embedding(ids.long(), self.quantize.codes()).permute(0, 3, 1, 2).contiguous()
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct x (in [-1, 1]) through the codebook."""
        return self.decode_ids(self.encode_ids(x))


# --------------------------------------------------------------------------------------------
# loading original checkpoints
# --------------------------------------------------------------------------------------------

def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure gets the same advice
        raise ValueError(
            f"{path}: could not be read with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Old Lightning checkpoints can hold pickled "
            "Python objects (callbacks, hyper-parameters) that safe loading refuses. If you trust the file, "
            "extract the weights once into a safetensors file and point at that instead:\n"
            "  python -c \"import torch; from safetensors.torch import save_file; "
            f"sd = torch.load('{path}', map_location='cpu', weights_only=False); sd = sd.get('state_dict', sd); "
            "save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith('loss.')}, "
            "'vqgan.safetensors')\"") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (or a Lightning checkpoint with 'state_dict'), "
                         f"got {type(obj).__name__}")
    return dict(obj)


def _listing(title: str, items: list[str], limit: int = 10) -> str:
    if not items:
        return ""
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more


def infer_taming_config(state: Mapping[str, torch.Tensor], resolution: int = 256) -> dict:
    """Read what architecture fields can be read off a taming state dict (best effort, for error messages)."""
    out: dict = {}

    def shape(key):
        v = state.get(key)
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    if (s := shape("quantize.embedding.weight")) and len(s) == 2:
        out["n_embed"], out["codebook_dim"] = s
    if (s := shape("encoder.conv_out.weight")) and len(s) == 4:
        out["z_channels"] = s[0]
    levels = sorted({int(k.split(".")[2]) for k in state
                     if k.startswith("encoder.down.") and k.split(".")[2].isdigit()})
    if (s := shape("encoder.conv_in.weight")) and len(s) == 4 and levels:
        ch = s[0]
        out["ch"] = ch
        mult = []
        for i in range(levels[-1] + 1):
            w = shape(f"encoder.down.{i}.block.0.conv1.weight")
            if not w or w[0] % ch:
                mult = []
                break
            mult.append(w[0] // ch)
        if mult:
            out["ch_mult"] = mult
        blocks = {int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block.")}
        if blocks:
            out["num_res_blocks"] = max(blocks) + 1
        attn = [i for i in levels if any(k.startswith(f"encoder.down.{i}.attn.") for k in state)]
        out["attn_resolutions"] = [resolution // 2 ** i for i in attn]
    return out


def _hints(missing: list[str], unexpected: list[str], shapes: list[tuple[str, tuple, tuple]]) -> list[str]:
    """Which config fields a mismatch most likely points at (from the key names alone)."""
    hints = []
    touched = missing + unexpected + [k for k, _, _ in shapes]
    if any(k.startswith("quantize.embedding") for k, _, _ in shapes):
        hints.append("n_embed / codebook_dim (the codebook quantize.embedding.weight is n_embed x codebook_dim; "
                     "taming's embed_dim)")
    if any(k.startswith(("quant_conv", "post_quant_conv")) for k, _, _ in shapes):
        hints.append("codebook_dim / z_channels (quant_conv maps z_channels -> codebook_dim)")
    if any(k.startswith(("encoder.conv_out", "decoder.conv_in")) for k, _, _ in shapes):
        hints.append("z_channels")
    if any(".down." in k or ".up." in k or ".mid." in k for k in touched) or any(
            k.startswith(("encoder.conv_in", "encoder.norm_out", "decoder.norm_out")) for k, _, _ in shapes):
        hints.append("ch / ch_mult (channel widths and the number of levels: (1,1,2,2,4) is f=16, (1,2,2,4) f=8)")
    if any(".block." in k for k in missing + unexpected):
        hints.append("num_res_blocks")
    if any(".attn." in k for k in missing + unexpected):
        hints.append("attn_resolutions / resolution (attention sits at the levels whose resolution is listed)")
    if any(k.startswith("quantize.embed.") or k.startswith("quantize.proj") for k in unexpected):
        hints.append("this looks like a GumbelQuantize model (quantize.embed / quantize.proj), which is not supported")
    prefixes = {k.split(".", 1)[0] for k in unexpected} - {"encoder", "decoder", "quantize", "quant_conv",
                                                           "post_quant_conv"}
    if prefixes and len(unexpected) > len(missing) // 2:
        hints.append(f"unexpected top-level prefixes {sorted(prefixes)[:5]}: the VQGAN may be nested inside a larger "
                     "model (e.g. 'first_stage_model.'); extract it first")
    return hints or ["ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, n_embed, codebook_dim"]


def _suggestion(config: dict, inferred: dict) -> str:
    diff = {k: v for k, v in inferred.items() if config.get(k) != v}
    if not diff:
        return ""
    return "\n  the file's weights look like: " + ", ".join(f"{k}={v}" for k, v in diff.items()) + \
        f" (attn_resolutions assuming resolution={config['resolution']})" * ("attn_resolutions" in diff)


def load_taming_checkpoint(path: str | os.PathLike, config: Mapping) -> TamingVQGAN:
    """Build a ``TamingVQGAN`` from ``config`` and load a local taming checkpoint into it, strictly.

    ``path``: a ``.ckpt`` / ``.pt`` / ``.pth`` (read with ``torch.load(weights_only=True)``; a Lightning
    ``{"state_dict": ...}`` wrapper is unwrapped) or a ``.safetensors`` state dict. ``loss.*`` keys
    (discriminator / LPIPS) are dropped. Any other mismatch raises ValueError naming the keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"taming VQGAN checkpoint {path} not found (only local files are read)")
    state = _read_state_dict(path)
    dropped = [k for k in state if k.startswith("loss.")]
    for k in dropped:
        del state[k]
    log.info("%s: %d tensors, dropped %d loss.* keys (discriminator / perceptual loss)", path, len(state), len(dropped))

    model = TamingVQGAN(config)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        c = model.config
        arch = ", ".join(f"{k}={c[k]}" for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                                                   "z_channels", "n_embed", "codebook_dim", "resolution"))
        raise ValueError(
            f"{path} does not match the taming VQGAN config ({arch}):"
            + _listing("missing keys (in the model, not in the file)", missing)
            + _listing("unexpected keys (in the file, not in the model)", unexpected)
            + _listing("shape mismatches (key: file vs model)", [f"{k}: {a} vs {b}" for k, a, b in shapes])
            + "\n  likely wrong config fields: " + "; ".join(_hints(missing, unexpected, shapes))
            + _suggestion(c, infer_taming_config(state, c["resolution"])))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# the seit tokenizer
# --------------------------------------------------------------------------------------------

class TamingVQGANTokenizer(Tokenizer):
    kind = "taming_vqgan"
    bf16 = True

    def __init__(self, model: TamingVQGAN, batch_size: int = 32):
        self.model = model.eval().requires_grad_(False)
        self.config = model.config
        self.image_size = int(self.config["image_size"])
        self.downsample = model.downsample
        self.batch_size = int(batch_size)

    @property
    def device(self) -> torch.device:
        return self.model.quantize.embedding.weight.device

    def to(self, device: str | torch.device) -> "TamingVQGANTokenizer":
        self.model.to(device)
        return self

    @property
    def codebook(self) -> torch.Tensor:
        """The K x codebook_dim vectors the decoder sees: the embedding weight (L2-normalized if ``l2_normalized``)."""
        return self.model.quantize.codes().detach().float().cpu()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (s, s):
            raise ValueError(f"expected [B,3,{s},{s}] images ({s}x{s}), got {tuple(images.shape)}")
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].to(self.device, torch.float32) * 2 - 1
            out.append(self.model.encode_ids(x).to(images.device))
        return torch.cat(out) if out else torch.empty(0, *self.grid, dtype=torch.long, device=images.device)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 3:
            raise ValueError(f"expected ids [B,h,w], got {tuple(ids.shape)}")
        out = []
        for start in range(0, ids.shape[0], self.batch_size):
            x = self.model.decode_ids(ids[start : start + self.batch_size].to(self.device))
            out.append(((x.clamp(-1, 1) + 1) / 2).to(ids.device))
        return torch.cat(out)

    def save(self, path: str | os.PathLike) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        atomic_save_tensors(path, tensors, metadata={"kind": self.kind, "config": json.dumps(self.config, sort_keys=True),
                                                     "image_size": str(self.image_size), "downsample": str(self.downsample)})

    @classmethod
    def from_state(cls, tensors: dict, metadata: dict) -> "TamingVQGANTokenizer":
        model = TamingVQGAN(json.loads(metadata["config"]))
        model.load_state_dict(tensors, strict=True)
        return cls(model)


def from_taming_checkpoint(path: str | os.PathLike, cfg: Mapping) -> TamingVQGANTokenizer:
    """A tokenizer from an original taming checkpoint; ``cfg`` is conf/tokenizer/taming_vqgan.yaml
    (or taming's own model config). Optional ``cfg.batch_size`` bounds the encode/decode batch and
    ``cfg.device`` ("cpu", "cuda", "auto", ...; see ``encode_device``) is where the model runs; ids and
    images come back on the device of the inputs."""
    extra = _plain(cfg)
    tok = TamingVQGANTokenizer(load_taming_checkpoint(path, cfg), batch_size=extra.get("batch_size") or 32)
    return tok.to(encode_device(extra.get("device"))) if extra.get("device") else tok
