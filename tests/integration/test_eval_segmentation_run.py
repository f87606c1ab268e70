"""task=eval eval=[segmentation] through run.py: a trained token classifier's grid features segment a
CamVid-like set (linear frozen and decoder fine-tuned, 1 epoch); a missing set is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import make_image_folder
from run_helpers import run, synthetic

COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230], [128, 128, 128]])  # classes 0-2, void grey


def camvid_like(root: Path, train: int = 6, val: int = 3) -> Path:
    """32x24 JPEGs of coloured 8x8 blocks (the class) or grey (void = 3) and their masks."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for d in ("images", "masks"):
            (root / split / d).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = np.kron(rng.integers(0, 4, (3, 4)), np.ones((8, 8), np.int64)).astype(np.uint8)
            Image.fromarray(COLOURS[mask].astype(np.uint8)).save(root / split / "images" / f"f{i}.jpg", quality=95)
            Image.fromarray(mask, "L").save(root / split / "masks" / f"f{i}.png")
    return root


def test_eval_segmentation_scores_a_trained_token_model(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=3, train=12, val=6)
    base = [*synthetic(tmp_path, images), f"data.root={tmp_path}/ds"]
    run(*base)
    ckpt = json.loads((tmp_path / "run" / "summary.json").read_text())["last_ckpt_path"]
    seg = camvid_like(tmp_path / "camvid")

    out = tmp_path / "eval"
    # 2 px tokens x stem stride 2: inputs are multiples of 4 px (16x12 -> a 4x3 feature grid)
    settings = [f"eval.segmentation.root={seg}", "eval.segmentation.runs=[linear_frozen,decoder_finetune]",
                "eval.segmentation.width=16", "eval.segmentation.height=12", "eval.segmentation.epochs=1",
                "eval.segmentation.batch_size=4", "eval.segmentation.num_classes=3",
                "eval.segmentation.classes=[red,green,blue]"]
    run(*base, "task=eval", f"task.checkpoint={ckpt}", "eval=[segmentation]", f"hydra.run.dir={out}", *settings)
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    for run_name in ("linear_frozen", "decoder_finetune"):
        assert 0.0 <= m[f"eval/segmentation/miou/{run_name}"] <= 1.0
        assert 0.0 <= m[f"eval/segmentation/pixel_acc/{run_name}"] <= 1.0
        assert (out / "segmentation" / run_name / "confusion.csv").is_file()
    details = summary["details"]["segmentation"]
    assert details["feature_grid"] == [4, 3] and details["runs"]["decoder_finetune"]["output_grid"] == [8, 6]  # w x h
    assert set(details["runs"]["linear_frozen"]["per_class_iou"]) == {"red", "green", "blue"}
    report = (out / "eval.md").read_text()
    assert "## segmentation" in report and "per-class IoU" in report

    proc = run(*base, "task=eval", f"task.checkpoint={ckpt}", "eval=[segmentation]", f"hydra.run.dir={tmp_path}/e1",
               *settings, f"eval.segmentation.root={tmp_path}/nowhere", check=False)
    assert proc.returncode != 0 and f"eval.segmentation.root: {tmp_path}/nowhere not found" in proc.stderr
    assert "Traceback" not in proc.stderr
