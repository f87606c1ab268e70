"""SeiT++ MTM through run.py as a user runs it: pre-train, fine-tune, linear probe (debug=fast, tiny data)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_image_folder
from run_helpers import paths, run, synthetic

pytestmark = pytest.mark.integration


def summary(tmp_path, run_dir: str) -> dict:
    return json.loads((tmp_path / run_dir / "summary.json").read_text())


def test_mtm_pretrain_then_finetune_then_linear_probe(tmp_path):
    images = make_image_folder(tmp_path / "images", train=16, val=6)
    base = [*synthetic(tmp_path, images), f"data.root={tmp_path}/ds", "model.depth=2"]
    run(*base, "experiment=seitpp_mtm", "aug.crop=6", f"hydra.run.dir={tmp_path}/mtm")
    s = summary(tmp_path, "mtm")
    assert s["global_step"] == 1  # 3 batches of 16 accumulated towards the recipe's 4096
    assert 0 <= s["metrics"]["val/mtm_acc"] <= 1 and s["metrics"]["train/mask_ratio"] >= 0.4
    assert (tmp_path / "mtm" / "mtm_predictions.png").is_file()
    pretrained = s["mtm_checkpoint"]

    run(*base, "experiment=seitpp_finetune", "aug.crop=6", f"model.pretrained={pretrained}",
        f"hydra.run.dir={tmp_path}/ft")
    ft = summary(tmp_path, "ft")
    assert 0 <= ft["metrics"]["val/acc1"] <= 1
    hparams = torch.load(ft["ckpt_path"], weights_only=True)["hyper_parameters"]
    assert hparams["model"]["pretrained"] == pretrained and hparams["optim"]["layer_decay"] == 0.65

    run(*base, "experiment=seitpp_linear", "aug.crop=6", f"model.pretrained={pretrained}",
        f"hydra.run.dir={tmp_path}/lin")
    state = torch.load(summary(tmp_path, "lin")["ckpt_path"], weights_only=True)["state_dict"]
    encoder = load_file(pretrained)
    for name in ("blocks.0.attn.qkv.weight", "patch_embed.tokens.weight", "patch_embed.proj.weight"):
        assert torch.equal(state[f"model.vit.{name}"], encoder[name]), name  # frozen under the probe

    proc = run(*base, "experiment=seitpp_finetune", "aug.crop=6", f"model.pretrained={pretrained}", "model.depth=3",
               f"hydra.run.dir={tmp_path}/bad", check=False)
    assert proc.returncode != 0 and "depth: checkpoint 2 vs model 3" in proc.stderr

    proc = run(*paths(tmp_path), "data=images", f"data.source={images}", "data.image_size=16", "model.input=pixels",
               "model.patch_size=4", f"model.pretrained={pretrained}", "debug=fast", f"hydra.run.dir={tmp_path}/px",
               check=False)
    assert proc.returncode != 0 and "cannot start a pixel model" in proc.stderr
