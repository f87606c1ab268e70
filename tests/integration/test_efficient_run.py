"""Efficient training through run.py: the vit24h recipes, the locality MLP and the grid-size curriculum."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder, on_quickstart_data
from run_helpers import run, synthetic
from seit.tasks.checkpoint import load_model

pytestmark = pytest.mark.integration


def logged(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


def test_vit24h_pixels_debug_fast_on_embedded_data(quickstart, tmp_path):
    """``python run.py experiment=vit24h_pixels debug=fast``: DeiT-S + locality + curriculum + DeiT recipe."""
    run(*on_quickstart_data(quickstart[0], tmp_path), "experiment=vit24h_pixels", "debug=fast")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["val/acc1"] <= 1.0
    assert summary["budget"]["max_time_s"] == 24 * 3600 and summary["curve"]
    hparams = torch.load(summary["last_ckpt_path"], weights_only=True)["hyper_parameters"]
    assert hparams["model"]["mlp_layer"] == "locality" and hparams["curriculum"]["start"] == 32
    assert hparams["aug"]["auto_augment"] == "rand-m9-mstd0.5-inc1" and hparams["aug"]["repeated_aug"] == 3
    assert logged(tmp_path / "run", "train/crop") == [32.0]  # the curriculum's first stage


def test_vit24h_tokens_trains_on_each_stage_of_its_curriculum(tmp_path):
    """The token recipe with a 3-epoch curriculum 2 -> 4 -> 6 ids: each epoch at its size, validated
    at the final size, and the exported model (locality MLP inside) runs on any grid."""
    images = make_image_folder(tmp_path / "images", classes=3, train=12, val=6)
    run("experiment=vit24h_tokens", *synthetic(tmp_path, images), "trainer.max_epochs=3", "task.curriculum.start=2",
        "task.curriculum.step=2", "task.curriculum.every=1")
    run_dir = tmp_path / "run"
    assert logged(run_dir, "train/crop") == [2.0, 4.0, 6.0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [p["epoch"] for p in summary["curve"]] == [0, 1, 2]
    model = load_model(summary["classifier_export"])
    assert model.net.vit.blocks[0].mlp.__class__.__name__ == "LocalityMlp"
    for side in (4, 6, 8):
        ids = torch.randint(0, 32, (2, side, side))
        assert model.logits(ids).shape == (2, 3)


def test_locality_vit_memorises_its_batches(quickstart, tmp_path):
    """debug=overfit with the locality MLP on the quickstart tokens. Measured: val/acc1 = 1.0."""
    run(*on_quickstart_data(quickstart[0], tmp_path), "debug=overfit", "model.mlp_layer=locality")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val/acc1"] >= 0.95, summary["metrics"]
