"""aug=deit end to end: the pixel baseline with DeiT's whole recipe trains and validates through run.py."""

from __future__ import annotations

import json

import pytest

from conftest import make_image_folder
from run_helpers import paths, run

pytestmark = pytest.mark.integration


def test_deit_recipe_trains_one_epoch_on_pixels(tmp_path):
    images = make_image_folder(tmp_path / "images", train=16, val=4)
    run(*paths(tmp_path), "data=images", f"data.source={images}", "data.image_size=16", "data.num_workers=1",
        "model.input=pixels", "model.patch_size=4", "aug=deit", "aug.crop=12", "debug=fast")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 <= s["metrics"]["val/acc1"] <= 1 and s["global_step"] == 3  # 48 images, 3 batches of 16 (limit 3)
    config = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    assert "rand-m9-mstd0.5-inc1" in config and "repeated_aug: 3" in config
