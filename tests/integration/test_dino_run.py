"""DINOv2 on tokens through run.py as a user runs it (debug=fast, tiny data): pre-train, then each
consumer of its export (eval, fine-tune, embed, distill), the pixel path and the ImageNet recipes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_image_folder
from run_helpers import paths, run, synthetic

pytestmark = pytest.mark.integration
SMALL_CROPS = ["task.crops.global_size=6", "task.crops.local_size=4", "task.crops.local_number=2"]
SMALL_HEADS = ["task.heads.prototypes=64", "task.heads.hidden=32", "task.heads.bottleneck=16"]


def summary(tmp_path, run_dir: str) -> dict:
    return json.loads((tmp_path / run_dir / "summary.json").read_text())


def test_dino_pretrain_then_eval_finetune_embed_and_distill(tmp_path):
    images = make_image_folder(tmp_path / "images", train=16, val=6)
    base = [*synthetic(tmp_path, images), f"data.root={tmp_path}/ds"]
    run(*base, "experiment=dino_tokens", *SMALL_CROPS, *SMALL_HEADS, "model.init_values=1e-5",
        f"hydra.run.dir={tmp_path}/dino")
    s = summary(tmp_path, "dino")
    assert s["global_step"] == 3 and 0 <= s["metrics"]["val/knn_acc1"] <= 1
    for name in ("dino", "ibot", "koleo"):
        assert torch.isfinite(torch.tensor(s["metrics"][f"train/{name}_loss"]))
    export = s["dino_export"]
    state = load_file(export)
    ckpt = torch.load(s["last_ckpt_path"], weights_only=True)
    for name in ("backbone.vit.blocks.0.attn.qkv.weight", "dino_head.prototypes", "ibot_head.prototypes"):
        assert torch.equal(state[name], ckpt["state_dict"][f"teacher.{name}"]), name  # the EMA teacher is exported

    run(*base, "task=eval", f"task.checkpoint={export}", "eval=[knn,linear,fewshot]", "eval.linear.epochs=2",
        f"hydra.run.dir={tmp_path}/eval")
    ev = summary(tmp_path, "eval")
    assert ev["model"]["kind"] == "dino" and 0 <= ev["metrics"]["eval/knn/acc1_k20"] <= 1

    run(*base, f"model.pretrained={export}", "model.init_values=1e-5", f"hydra.run.dir={tmp_path}/ft")
    ft = torch.load(summary(tmp_path, "ft")["ckpt_path"], weights_only=True)["hyper_parameters"]
    assert ft["model"]["pretrained"] == export
    proc = run(*base, f"model.pretrained={export}", f"hydra.run.dir={tmp_path}/bad", check=False)
    assert proc.returncode != 0 and "init_values (LayerScale): checkpoint True vs model False" in proc.stderr

    run(*base, "task=embed", f"task.checkpoint={export}", f"task.out_dir={tmp_path}/emb",
        f"hydra.run.dir={tmp_path}/embed")
    meta = json.loads((tmp_path / "emb" / "embeddings.json").read_text())
    assert meta["dim"] == 128 and meta["num_samples"] == 48

    run(*base, "experiment=distill_tokens", f"task.teacher.checkpoint={export}", *SMALL_CROPS, *SMALL_HEADS,
        f"hydra.run.dir={tmp_path}/distill")
    d = summary(tmp_path, "distill")
    student = torch.load(d["last_ckpt_path"], weights_only=True)["state_dict"]
    for name, value in state.items():  # the frozen teacher, bit for bit, heads included
        key = f"teacher_{name}" if name.startswith(("dino_head.", "ibot_head.")) else f"teacher.{name}"
        if key in student:
            assert torch.equal(student[key], value), key
    assert torch.equal(student["teacher_dino_head.prototypes"], state["dino_head.prototypes"])
    exported = load_file(d["dino_export"])
    assert exported["backbone.vit.pos_embed"].shape[-1] == 64  # the nano student, its EMA exported
    assert torch.equal(exported["dino_head.prototypes"], student["ema.module.dino_head.prototypes"])


def test_distill_refuses_a_teacher_of_another_codebook(tmp_path):
    images = make_image_folder(tmp_path / "images", train=16, val=6)
    run(*synthetic(tmp_path, images), f"data.root={tmp_path}/a", "experiment=dino_tokens", *SMALL_CROPS, *SMALL_HEADS,
        f"hydra.run.dir={tmp_path}/dino")
    export = summary(tmp_path, "dino")["dino_export"]
    other = [*synthetic(tmp_path, images, codebook_size=24), f"data.root={tmp_path}/b"]
    proc = run(*other, "experiment=distill_tokens", f"task.teacher.checkpoint={export}", *SMALL_CROPS, *SMALL_HEADS,
               f"hydra.run.dir={tmp_path}/distill", check=False)
    assert proc.returncode != 0 and "task.teacher.checkpoint" in proc.stderr and "codebook" in proc.stderr


def test_dino_on_pixels_through_the_same_task(tmp_path):
    images = make_image_folder(tmp_path / "images", train=16, val=6, size=32)
    run(*paths(tmp_path), "task=pretrain_dino", "data=images", f"data.source={images}", "data.image_size=32",
        "model.input=pixels", "model.patch_size=8", "aug.hflip=0.5", "task.crops.global_size=24",
        "task.crops.local_size=16", "task.crops.local_number=2", *SMALL_HEADS, "debug=fast",
        f"hydra.run.dir={tmp_path}/px")
    s = summary(tmp_path, "px")
    assert s["global_step"] == 3 and 0 <= s["metrics"]["val/knn_acc1"] <= 1
    assert load_file(s["dino_export"])["backbone.vit.patch_embed.proj.weight"].shape[1] == 3


def test_imagenet_recipes_run_in_seconds(tmp_path):
    images = make_image_folder(tmp_path / "images", train=16, val=6)
    base = [*synthetic(tmp_path, images), f"data.root={tmp_path}/ds", *SMALL_CROPS, "model.depth=1", "task.global_batch=null"]
    exports = {}
    for experiment in ("dino_vits_tokens", "dino_vitb_tokens"):
        run(*base, f"experiment={experiment}", f"hydra.run.dir={tmp_path}/{experiment}")
        s = summary(tmp_path, experiment)
        assert s["global_step"] == 3
        hp = torch.load(s["last_ckpt_path"], weights_only=True, mmap=True)["hyper_parameters"]
        assert hp["heads"]["prototypes"] == 65536 and hp["model"]["init_values"] == 1e-5
        assert hp["teacher"]["momentum"] == 0.994 and hp["weight_decay_end"] == 0.2
        exports[experiment] = s["dino_export"]
    run(*base, "experiment=distill_vits_tokens", f"task.teacher.checkpoint={exports['dino_vitb_tokens']}",
        f"hydra.run.dir={tmp_path}/distill")
    hp = torch.load(summary(tmp_path, "distill")["last_ckpt_path"], weights_only=True, mmap=True)["hyper_parameters"]
    assert hp["model"]["embed_dim"] == 384 and hp["model"]["drop_path_rate"] == 0.0 and hp["masks"]["probability"] == 0
