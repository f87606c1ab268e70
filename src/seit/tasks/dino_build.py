"""DINO networks from configs: what ``task=pretrain_dino`` / ``task=distill`` build and what reading a
DINO checkpoint back rebuilds (``seit.tasks.checkpoint``), without a distillation teacher."""

from __future__ import annotations

from seit.models.dino import DinoHead, DinoModel
from seit.tasks.base import build_model


def build_dino(model: dict, heads: dict, data_kind: str, input_size: int, sizes: dict) -> DinoModel:
    """A ``DinoModel`` from a ``conf/model`` config (forced to a class token) and ``task.heads``."""
    if (model.get("input", "tokens") == "tokens") != (data_kind == "tokens"):
        raise ValueError(f"model.input={model.get('input')!r} does not fit data.kind={data_kind!r}")
    if model.get("pretrained"):
        raise ValueError("model.pretrained: DINO pre-training and distillation start the student from random init "
                         "(a teacher for task=distill is task.teacher.checkpoint)")
    backbone = build_model({**model, "class_token": True}, input_size=input_size, num_classes=0, **sizes)
    width = backbone.vit.embed_dim
    h = dict(heads)
    ibot_prototypes = h.pop("ibot_prototypes", None) or h["prototypes"]
    return DinoModel(backbone, DinoHead(width, **h), DinoHead(width, **{**h, "prototypes": ibot_prototypes}))


def global_crop_size(crops: dict, aug: dict, input_grid: int) -> int:
    """The global crops' side: ``crops.global_size``, else ``aug.crop``, else the whole input grid."""
    return int(crops.get("global_size") or aug.get("crop") or input_grid)


def dino_from_hparams(hp: dict) -> tuple[DinoModel, str, int]:
    """(an empty ``DinoModel``, the state-dict prefix of the network a run exports, its global crop size)
    from a pretrain_dino / distill checkpoint's hyper-parameters, without loading a distillation teacher."""
    data = hp["data"]
    size = global_crop_size(hp["crops"], hp["aug"], data["input_grid"])
    sizes = {"codebook_size": data["codebook_size"], "codebook_dim": data["codebook_dim"]} \
        if data["kind"] == "tokens" else {}
    prefix = "ema.module." if hp["teacher"].get("checkpoint") else "teacher."
    return build_dino(hp["model"], hp["heads"], data["kind"], size, sizes), prefix, size
