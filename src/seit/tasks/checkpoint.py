"""Any trained model of ours, from its file, behind one interface: what evaluation, embedding and
prediction read.

Accepted files:

- a Lightning ``.ckpt`` of ``task=train`` (classifier, tokens or pixels), ``task=continual`` (its
  slot-ordered head is read back in label order), ``task=pretrain_mtm`` (encoder only), or
  ``task=pretrain_dino`` / ``task=distill`` (the EMA teacher / the student's EMA, heads included);
- ``classifier.safetensors`` (``task=train`` / ``task=continual`` export), ``mtm.safetensors`` and
  ``dino.safetensors``.

Anything else is refused with a one-line error naming the file and what it looks like.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from seit.augment.crop import center_crop
from seit.data.dataset_info import DatasetError
from seit.models.export import read_classifier
from seit.tasks.base import build_model
from seit.utils.checkpoint_io import unreadable

KINDS = ("classifier", "continual", "mtm", "dino")


@dataclass
class LoadedModel:
    """A trained network with what evaluation needs to know about it.

    Inputs ``x`` are what the data modules give: ids ``[B, H, W]`` (any integer dtype) for a token
    model, uint8 images ``[B, 3, S, S]`` for a pixel model.

    - ``kind``: ``classifier``, ``continual`` or ``mtm``; ``input``: ``tokens`` or ``pixels``;
    - ``fingerprint``: the codebook sha256 a token model was trained on (None: pixels, or unknown);
    - ``num_classes`` (0: no classifier head), ``classes`` (names in label order, when the file has them);
    - ``crop``: the evaluation view's side (centre crop of the input grid; 0 = the whole input);
    - ``dim``: the width of ``features``;
    - ``reads_ids``: ``tokens`` takes ids [B, H, W] (an MTM encoder), not the embedding map;
    - ``heads``: (DINO head, iBOT head) of a DINO model, else None.
    """

    kind: str
    input: str
    net: nn.Module
    path: Path
    dim: int
    fingerprint: str | None = None
    num_classes: int = 0
    classes: list[str] | None = None
    crop: int = 0
    _features: Callable | None = None
    _logits: Callable | None = None
    _grid: Callable | None = None
    _tokens: Callable | None = None
    reads_ids: bool = False
    heads: tuple | None = None

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation view of an input batch: its centre ``crop`` (the model's training eval view)."""
        if not self.crop or self.crop >= x.shape[-1]:
            return x
        return center_crop(x, self.crop)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits features ``[B, dim]`` (float32) of the evaluation view."""
        return self._features(self.view(x)).float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores ``[B, num_classes]`` in label order. ValueError when the model has no head."""
        if self._logits is None:
            raise ValueError(f"{self.path} is a {self.kind} model without a classifier head; evaluate it with "
                             "eval=[knn,linear,fewshot,segmentation] (frozen features)")
        return self._logits(self.view(x)).float()

    def grid_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position features ``[B, dim, h, w]`` of the whole input (no crop), for dense heads;
        differentiable, so a fine-tuned head can train the body through it."""
        return self._grid(x)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled or class features [B, dim], patch features [B, h*w, dim]) of a body input: the
        embedding map [B, D, h, w] (tokens; ids [B, h, w] when ``reads_ids``) or the normalised image
        (pixels), at any grid and without the evaluation crop: what a distillation teacher reads."""
        return self._tokens(x)

    def to(self, device) -> "LoadedModel":
        self.net.to(device)
        return self

    def eval(self) -> "LoadedModel":
        self.net.eval()
        return self

    def check_codebook(self, fingerprint: str | None, where: str) -> None:
        """Refuse data tokenized with another codebook than the one this model learned."""
        if self.input == "tokens" and fingerprint and self.fingerprint and fingerprint != self.fingerprint:
            raise DatasetError(f"codebook mismatch: {self.path} was trained on codebook {self.fingerprint[:12]}…, "
                               f"{where} uses {fingerprint[:12]}…; its ids would mean other things to this model")


def load_model(path: str | Path, what: str = "task.checkpoint") -> LoadedModel:
    """The model in ``path`` (see the module doc), in eval mode on the CPU."""
    path = Path(path)
    if path.is_dir():
        found = [str(path / f) for f in ("classifier.safetensors", "mtm.safetensors", "checkpoints/last.ckpt")
                 if (path / f).is_file()]
        raise ValueError(f"{what}: {path} is a directory; pass a file of it" +
                         (f": {' or '.join(found)}" if found else " (a run's classifier.safetensors, mtm.safetensors "
                          "or checkpoints/last.ckpt)"))
    with unreadable(path, what):
        if path.suffix == ".safetensors":
            loaded = _from_export(path, what)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
                raise ValueError(f"{what}: {path} is not a Lightning checkpoint of ours (no hyper_parameters / "
                                 "state_dict), nor a classifier.safetensors or mtm.safetensors export")
            loaded = _from_lightning(path, ckpt["hyper_parameters"], ckpt["state_dict"], what)
    return loaded.eval()


# -- classifiers -------------------------------------------------------------------------------
def vit_model(kind: str, net: nn.Module, path: Path, *, crop: int, fingerprint: str | None, num_classes: int,
              classes: list[str] | None = None, class_index: torch.Tensor | None = None) -> LoadedModel:
    """A ``TokenViT``: features, logits (``class_index``: the head row of each label) and grid features."""
    vit = net.vit

    def logits(x):
        out = net(net.embed(x))
        return out if class_index is None else out[:, class_index.to(out.device)]

    def grid(x):
        tokens = vit.forward_features(net.body_input(net.embed(x)))  # [B, h*w, E] (no class token)
        h, w = _grid_shape(vit, x)
        return tokens.transpose(1, 2).reshape(len(x), -1, h, w)

    def tokens(x):
        out = vit.forward_features(net.body_input(x))
        return vit.forward_head(out, pre_logits=True), out[:, vit.num_prefix_tokens:]

    return LoadedModel(kind=kind, input="tokens" if _is_token_model(net) else "pixels", net=net, path=path,
                       dim=vit.embed_dim, fingerprint=fingerprint, num_classes=num_classes, classes=classes, crop=crop,
                       _features=lambda x: net.features(net.embed(x)), _logits=logits, _grid=grid, _tokens=tokens)


def _is_token_model(net: nn.Module) -> bool:
    return hasattr(net.embed, "codebook")


def _grid_shape(vit: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    stride = vit.patch_embed.patch_size
    stride = stride if isinstance(stride, (tuple, list)) else (stride, stride)
    return x.shape[-2] // stride[0], x.shape[-1] // stride[1]


def _from_export(path: Path, what: str) -> LoadedModel:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        kind = (f.metadata() or {}).get("kind")
    if kind == "mtm":
        from seit.models.export import load_mtm

        model, fingerprint = load_mtm(path)
        return _mtm(model, path, fingerprint or None)
    if kind == "dino":
        from seit.models.export import read_dino
        from seit.tasks.dino_build import build_dino

        state, config, fingerprint = read_dino(path, what)
        sizes = {k: config[k] for k in ("codebook_size", "codebook_dim")} if config["data_kind"] == "tokens" else {}
        model = build_dino(config["model"], config["heads"], config["data_kind"], config["input_size"], sizes)
        model.load_state_dict(state)
        return dino_model(model, path, fingerprint, config["input_size"])
    if kind == "classifier":
        state, meta = read_classifier(path, what)
        facts = meta["config"]
        sizes = {k: facts[k] for k in ("codebook_size", "codebook_dim") if k in facts}
        # the network was built at its crop (the task's input_size); input_size is the data's grid
        net = build_model(facts["model"], input_size=meta["crop"] or meta["input_size"],
                          num_classes=len(meta["classes"]), **sizes)
        net.load_state_dict(state)
        return vit_model("classifier", net, path, crop=meta["crop"], fingerprint=meta["codebook_sha256"],
                         num_classes=len(meta["classes"]), classes=meta["classes"])
    raise ValueError(f"{what}: {path} is a safetensors file of kind {kind!r}; task=eval takes a classifier.safetensors, "
                     "mtm.safetensors or dino.safetensors export, or a Lightning .ckpt of task=train, continual, "
                     "pretrain_mtm, pretrain_dino or distill")


def _from_lightning(path: Path, hp: dict, state: dict, what: str) -> LoadedModel:
    if "mask" in hp:
        from seit.tasks.mtm import MTMTask

        task = MTMTask.from_hparams(hp)
        task.load_state_dict(state)
        return _mtm(task.model, path, task.data.codebook_sha256)
    if "crops" in hp:
        from seit.tasks.dino_build import dino_from_hparams

        model, prefix, size = dino_from_hparams(hp)
        model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return dino_model(model, path, hp["data"].get("codebook_sha256"), size)
    if "label_smoothing" in hp:
        if "class_order" in hp:
            from seit.tasks.continual import ContinualTask as cls
        else:
            from seit.tasks.classification import ClassificationTask as cls
        task = cls.from_hparams(hp)
        # a frozen TokenAdapt rides along in augmenting checkpoints; evaluation never uses it
        task.load_state_dict({k: v for k, v in state.items() if not k.startswith("tokenadapt.")}, strict=False)
        net = task.ema.module if task.ema is not None else task.model
        kind = "continual" if "class_order" in hp else "classifier"
        index = task.slot_of if kind == "continual" else None
        return vit_model(kind, net, path, crop=task.crop, fingerprint=task.data.codebook_sha256,
                         num_classes=task.data.num_classes, class_index=index)
    raise ValueError(f"{what}: {path} is a checkpoint of an unknown task (hyper-parameters {sorted(hp)}); "
                     f"task=eval takes {', '.join(KINDS)} checkpoints or their exports")


# -- self-supervised models --------------------------------------------------------------------
def dino_model(model: nn.Module, path: Path, fingerprint: str | None, crop: int) -> LoadedModel:
    """A ``DinoModel``: the class token as features (DINO's k-NN and linear protocols), the patch
    tokens as the dense grid, any grid size."""
    backbone = model.backbone

    def grid(x):
        _, patches = model.tokens(backbone.embed(x))
        h, w = _grid_shape(backbone.vit, x)
        return patches.transpose(1, 2).reshape(len(x), -1, h, w)

    return LoadedModel(kind="dino", input="tokens" if _is_token_model(backbone) else "pixels", net=model, path=path,
                       dim=backbone.vit.embed_dim, fingerprint=fingerprint, crop=crop,
                       _features=lambda x: model.tokens(backbone.embed(x))[0], _grid=grid, _tokens=model.tokens,
                       heads=(model.dino_head, model.ibot_head))


def _mtm(model: nn.Module, path: Path, fingerprint: str | None) -> LoadedModel:
    """The MTM encoder with nothing masked: mean patch output as features; any grid for dense heads
    (the fixed sin-cos positions are recomputed at the input's grid)."""
    from seit.models.tokenadapt import sincos_pos

    model.patch_embed.strict_img_size = False  # any grid (even sides); positions are recomputed below

    def encode(ids):  # [B, 1 + h*w, E]: the class slot, then the patches
        x = model.patch_embed(ids)  # [B, h*w, E] at stride 2
        x = x + sincos_pos(ids.shape[-2] // 2, ids.shape[-1] // 2, x.shape[-1]).to(x)
        cls = (model.cls_token + model.pos_embed[:, :1]).expand(len(x), 1, -1)
        return model.norm(model.blocks(torch.cat([cls.to(x.dtype), x], 1)))

    def grid(ids):
        out = encode(ids)[:, 1:]
        return out.transpose(1, 2).reshape(len(ids), -1, ids.shape[-2] // 2, ids.shape[-1] // 2)

    def tokens(ids):  # the mean patch output stands for the class token, as in ``features``
        out = encode(ids)[:, 1:]
        return out.mean(1), out

    def features(ids):
        if ids.shape[-1] != model.grid or ids.shape[-2] != model.grid:
            return grid(ids).mean((2, 3))
        return model.features(ids)

    return LoadedModel(kind="mtm", input="tokens", net=model, path=path, dim=model.config["embed_dim"],
                       fingerprint=fingerprint, crop=model.grid, _features=features, _grid=grid, _tokens=tokens,
                       reads_ids=True)


def normalized(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows (cosine k-NN and the embedding store read these)."""
    return F.normalize(features.float(), dim=-1)
