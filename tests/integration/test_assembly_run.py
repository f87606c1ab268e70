"""Config-composed assembly through run.py: a swapped timm part trains with no code change, and
a checkpoint written before the change still embeds."""

from __future__ import annotations

import json

import torch

from conftest import make_image_folder
from run_helpers import run, synthetic


def test_a_timm_injection_point_swaps_from_the_command_line(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=3, train=12, val=6)
    run(*synthetic(tmp_path, images), f"data.root={tmp_path}/ds", "model.mlp_layer=timm.layers.GluMlp",
               "model.norm_layer=torch.nn.RMSNorm")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "train" and summary["global_step"] > 0
    assert summary["val/acc1"] >= 0.6  # 3 colour classes: chance 1/3, measured 1.0
    state = torch.load(summary["last_ckpt_path"], map_location="cpu", weights_only=True)["state_dict"]
    fc1, fc2 = state["model.vit.blocks.0.mlp.fc1.weight"], state["model.vit.blocks.0.mlp.fc2.weight"]
    assert fc2.shape[1] == fc1.shape[0] // 2  # a gated MLP: half of fc1's outputs gate the other half
    assert "model.vit.blocks.0.norm1.weight" in state and "model.vit.blocks.0.norm1.bias" not in state  # RMSNorm
