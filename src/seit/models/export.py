"""The files a training run hands to the next one, written and read here only.

- ``mtm.safetensors`` (task=pretrain_mtm): the masked token model with its config and the codebook
  fingerprint. ``model.pretrained`` starts a classifier from its encoder (``load_encoder_into``),
  and task=embed reads its features.
- ``tokenadapt.safetensors`` (task=train_tokenadapt): TokenAdapt's two converters with their
  config and codebook fingerprint, used frozen by ``aug.tokenadapt.checkpoint``.
- ``classifier.safetensors`` (task=train, task=continual): a classifier with its config, eval crop,
  class names and codebook fingerprint, for ``task=eval`` and ``seit.predict``.
- ``dino.safetensors`` (task=pretrain_dino: the EMA teacher; task=distill: the student's EMA): a
  ``DinoModel`` (class-token backbone, DINO and iBOT heads) with the config that rebuilds it and the
  codebook fingerprint. ``model.pretrained`` starts a classifier from its backbone, ``task=eval`` /
  ``task=embed`` read its class token, and ``task=distill`` takes it as a teacher, heads included.

All are safetensors files (no pickle) written atomically; each reader refuses another kind of
file, another codebook and another architecture with a one-line error naming the file.
(Tokenizer files are written and read by ``seit.tokenizers``.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from seit.models.mtm import MaskedTokenModel
from seit.models.tokenadapt import TokenAdapt, sincos_pos
from seit.utils.checkpoint_io import unreadable
from seit.utils.io import atomic_save_tensors

MTM_FILE = "mtm.safetensors"
TOKENADAPT_FILE = "tokenadapt.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"
DINO_FILE = "dino.safetensors"
# what must agree between a pre-trained encoder and the classifier that loads it
ARCH_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "codebook_size", "codebook_dim")
RENAMED = {"token_dim": "codebook_dim"}  # config keys of exports written before the rename


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _read(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    with unreadable(path, what), safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


# -- MTM ---------------------------------------------------------------------------------------
def save_mtm(model: MaskedTokenModel, path: str | Path, fingerprint: str) -> None:
    atomic_save_tensors(path, _state(model), {"kind": "mtm", "config": json.dumps(model.config),
                                              "codebook_sha256": fingerprint})


def read_mtm(path: str | Path) -> tuple[dict, dict, str]:
    """(state, config, codebook fingerprint) of an exported MTM model."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.pretrained: {path} not found (task=pretrain_mtm writes <run>/{MTM_FILE})")
    state, meta = _read(path, "model.pretrained")
    if meta.get("kind") != "mtm" or "config" not in meta:
        raise ValueError(f"model.pretrained: {path} is not an MTM export (task=pretrain_mtm writes <run>/{MTM_FILE})")
    config = {RENAMED.get(k, k): v for k, v in json.loads(meta["config"]).items()}
    return state, config, meta.get("codebook_sha256", "")


def load_mtm(path: str | Path) -> tuple[MaskedTokenModel, str]:
    """(the exported model, its codebook fingerprint)."""
    state, config, fingerprint = read_mtm(path)
    model = MaskedTokenModel(**config)
    model.load_state_dict(state)
    return model, fingerprint


def load_encoder_into(classifier, path: str | Path, codebook_sha256: str | None) -> None:
    """Copy a pre-trained MTM encoder (id embedding, stem, blocks) into a ``TokenViT`` with
    ``embedding=learned``; positions become the fixed sin-cos grid the encoder was trained with,
    at the classifier's grid. The head starts near zero (MAE/SeiT++: std 2e-5)."""
    state, config, fingerprint = read_mtm(path)
    if not getattr(classifier, "requantize", False):
        raise ValueError("model.pretrained needs model.embedding=learned (the MTM encoder reads ids, not codebook vectors)")
    if codebook_sha256 and fingerprint and fingerprint != codebook_sha256:
        raise ValueError(f"model.pretrained: {path} was pre-trained on codebook {fingerprint[:12]}…, but this dataset's "
                         f"codebook is {codebook_sha256[:12]}…; pre-train on tokens from the same tokenizer")
    vit = classifier.vit
    own = {"embed_dim": vit.embed_dim, "depth": len(vit.blocks), "num_heads": vit.blocks[0].attn.num_heads,
           "mlp_ratio": vit.blocks[0].mlp.fc1.out_features / vit.embed_dim,
           "codebook_size": vit.patch_embed.tokens.num_embeddings, "codebook_dim": vit.patch_embed.tokens.embedding_dim}
    bad = [f"{key}: checkpoint {config[key]} vs model {own[key]}" for key in ARCH_KEYS
           if float(config[key]) != float(own[key])]
    if bad:
        raise ValueError(f"model.pretrained: {path} does not fit model.*: " + "; ".join(bad))
    encoder = {k: v for k, v in state.items() if k.startswith(("patch_embed.", "blocks."))}
    missing, unexpected = vit.load_state_dict(encoder, strict=False)
    left = [k for k in missing if not k.startswith(("head.", "fc_norm.", "norm.", "pos_embed"))]
    if left or unexpected:
        raise ValueError(f"model.pretrained: {path} does not fit the classifier (missing {left[:5]}, unexpected {unexpected[:5]})")
    side = vit.patch_embed.grid_size
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_pos(side[0], side[1], vit.embed_dim))
        torch.nn.init.trunc_normal_(vit.head.weight, std=2e-5)
        torch.nn.init.zeros_(vit.head.bias)


# -- DINO --------------------------------------------------------------------------------------
def save_dino(model: torch.nn.Module, path: str | Path, *, config: dict, fingerprint: str | None) -> None:
    """A ``DinoModel`` with ``config``: {"model": conf/model dict, "heads": task.heads, "input_size",
    "data_kind", "codebook_size", "codebook_dim"}."""
    atomic_save_tensors(path, _state(model), {"kind": "dino", "config": json.dumps(config),
                                              "codebook_sha256": fingerprint or ""})


def read_dino(path: str | Path, what: str = "model.pretrained") -> tuple[dict, dict, str | None]:
    """(state, config, codebook fingerprint or None) of a ``dino.safetensors`` export."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what}: {path} not found (task=pretrain_dino and task=distill write <run>/{DINO_FILE})")
    state, meta = _read(path, what)
    if meta.get("kind") != "dino" or "config" not in meta:
        raise ValueError(f"{what}: {path} is not a DINO export (task=pretrain_dino writes <run>/{DINO_FILE})")
    return state, json.loads(meta["config"]), meta.get("codebook_sha256") or None


# -- TokenAdapt --------------------------------------------------------------------------------
def save_tokenadapt(adapt: TokenAdapt, path: str | Path, fingerprint: str) -> None:
    atomic_save_tensors(path, _state(adapt), {"config": json.dumps(adapt.config), "codebook_sha256": fingerprint})


def load_tokenadapt(path: str | Path, expected_fingerprint: str | None = None) -> TokenAdapt:
    """A frozen TokenAdapt; refuses one trained on another codebook."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"TokenAdapt checkpoint {path} not found (train one with task=train_tokenadapt)")
    state, meta = _read(path, "TokenAdapt checkpoint")
    if "config" not in meta or "codebook" not in state:
        raise ValueError(f"{path} is not a TokenAdapt checkpoint (no config metadata or codebook)")
    if expected_fingerprint and meta.get("codebook_sha256") != expected_fingerprint:
        raise ValueError(f"{path} was trained on codebook {meta.get('codebook_sha256', '?')[:12]}…, "
                         f"but the dataset's is {expected_fingerprint[:12]}…")
    config = json.loads(meta["config"])
    adapt = TokenAdapt(state["codebook"], config["width"], config["heads"], config["mlp_ratio"])
    adapt.load_state_dict(state)
    return adapt.eval().requires_grad_(False)


# -- classifier --------------------------------------------------------------------------------
def save_classifier(model, path: str | Path, *, config: dict, input_size: int, crop: int, classes: list[str],
                    fingerprint: str | None) -> None:
    """A trained ``TokenViT`` (tokens or pixels) as one file: its weights, the config that rebuilds it
    (``{"model": conf/model dict, "codebook_size": K, "codebook_dim": D}``),
    the eval crop, the class names in label order and (tokens) the codebook fingerprint. What
    ``seit.predict`` and ``task=eval`` read; no pickle, no Lightning."""
    meta = {"kind": "classifier", "config": json.dumps(config), "input_size": str(input_size),
            "crop": str(crop), "classes": json.dumps(list(classes)), "codebook_sha256": fingerprint or ""}
    atomic_save_tensors(path, _state(model), meta)


def read_classifier(path: str | Path, what: str = "classifier export") -> tuple[dict, dict]:
    """(state, meta with ``config``, ``classes``, ``input_size``, ``crop``, ``codebook_sha256``) of a classifier export."""
    state, meta = _read(path, what)
    if meta.get("kind") != "classifier" or "config" not in meta:
        raise ValueError(f"{what}: {path} is not a classifier export (task=train writes <run>/{CLASSIFIER_FILE}); "
                         f"its kind is {meta.get('kind', 'unknown')!r}")
    return state, {"config": json.loads(meta["config"]), "classes": json.loads(meta["classes"]),
                   "input_size": int(meta["input_size"]), "crop": int(meta["crop"]),
                   "codebook_sha256": meta.get("codebook_sha256") or None}
