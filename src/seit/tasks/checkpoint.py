"""Any trained model of ours, from its file, behind one interface: what evaluation, embedding and
prediction read.

Accepted files:

- a Lightning ``.ckpt`` of ``task=train`` (classifier, tokens or pixels), ``task=continual`` (its
  slot-ordered head is read back in label order), or ``task=pretrain_mtm`` (encoder only);
- ``classifier.safetensors`` (``task=train`` / ``task=continual`` export) and ``mtm.safetensors``.

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

KINDS = ("classifier", "continual", "mtm")


@dataclass
class LoadedModel:
    """A trained network with what evaluation needs to know about it.

    Inputs ``x`` are what the data modules give: ids ``[B, H, W]`` (any integer dtype) for a token
    model, uint8 images ``[B, 3, S, S]`` for a pixel model.

    - ``kind``: ``classifier``, ``continual`` or ``mtm``; ``input``: ``tokens`` or ``pixels``;
    - ``fingerprint``: the codebook sha256 a token model was trained on (None: pixels, or unknown);
    - ``num_classes`` (0: no classifier head), ``classes`` (names in label order, when the file has them);
    - ``crop``: the evaluation view's side (centre crop of the input grid; 0 = the whole input);
    - ``dim``: the width of ``features``.
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

    return LoadedModel(kind=kind, input="tokens" if _is_token_model(net) else "pixels", net=net, path=path,
                       dim=vit.embed_dim, fingerprint=fingerprint, num_classes=num_classes, classes=classes, crop=crop,
                       _features=lambda x: net.features(net.embed(x)), _logits=logits, _grid=grid)


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
    raise ValueError(f"{what}: {path} is a safetensors file of kind {kind!r}; task=eval takes a classifier.safetensors "
                     "or mtm.safetensors export, or a Lightning .ckpt of task=train, continual or pretrain_mtm")


def _from_lightning(path: Path, hp: dict, state: dict, what: str) -> LoadedModel:
    if "mask" in hp:
        from seit.tasks.mtm import MTMTask

        task = MTMTask.from_hparams(hp)
        task.load_state_dict(state)
        return _mtm(task.model, path, task.data.codebook_sha256)
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


# -- masked token models -----------------------------------------------------------------------
def _mtm(model: nn.Module, path: Path, fingerprint: str | None) -> LoadedModel:
    """The MTM encoder with nothing masked: mean patch output as features; any grid for dense heads
    (the fixed sin-cos positions are recomputed at the input's grid)."""
    from seit.models.tokenadapt import sincos_pos

    model.patch_embed.strict_img_size = False  # any grid (even sides); positions are recomputed below

    def grid(ids):
        x = model.patch_embed(ids)  # [B, h*w, E] at stride 2
        h, w = ids.shape[-2] // 2, ids.shape[-1] // 2
        x = x + sincos_pos(h, w, x.shape[-1]).to(x)
        cls = (model.cls_token + model.pos_embed[:, :1]).expand(len(x), 1, -1)
        out = model.norm(model.blocks(torch.cat([cls.to(x.dtype), x], 1)))[:, 1:]
        return out.transpose(1, 2).reshape(len(x), -1, h, w)

    def features(ids):
        if ids.shape[-1] != model.grid or ids.shape[-2] != model.grid:
            return grid(ids).mean((2, 3))
        return model.features(ids)

    return LoadedModel(kind="mtm", input="tokens", net=model, path=path, dim=model.config["embed_dim"],
                       fingerprint=fingerprint, crop=model.grid, _features=features, _grid=grid)


def normalized(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows (cosine k-NN and the embedding store read these)."""
    return F.normalize(features.float(), dim=-1)
