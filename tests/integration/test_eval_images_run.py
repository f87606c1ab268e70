"""task=eval with the evaluators that read image files: eval=pixels and eval=robustness on the
quickstart's MNIST tokens (32 px) and digit images, through run.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import on_quickstart_data
from run_helpers import run

pytestmark = pytest.mark.integration


def test_pixels_and_robustness_through_run_py(quickstart, tmp_path):
    """Measured on 2 CPU cores: classify 3 s, pixels 6 s, robustness (1,000 digits x 3 conditions) 10 s."""
    qs = quickstart[0]
    run(*on_quickstart_data(qs, tmp_path), "task=eval", f"task.checkpoint={qs}/run/classifier.safetensors",
        "eval=[classify,pixels,robustness]", "eval.robustness.corruptions=[gaussian_noise,pixelate]",
        "eval.robustness.severities=[3]")
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    # the image files tokenized now score exactly as the shards, which score as eval=classify reads them
    assert m["eval/pixels/samples"] == 1000
    assert m["eval/pixels/acc1"] == m["eval/pixels/tokens_acc1"] == m["eval/classify/acc1"]
    assert m["eval/pixels/acc5"] == m["eval/pixels/tokens_acc5"] == m["eval/classify/acc5"]
    assert m["eval/pixels/ids_equal"] == 1 and m["eval/pixels/acc1_diff"] == 0
    # robustness: the clean images are the same images, so the same score; the grid is reported
    assert m["eval/robustness/clean_acc1"] == m["eval/pixels/acc1"]
    for key in ("mean_acc1", "relative_robustness", "acc1_gaussian_noise", "acc1_pixelate", "acc1_sev3"):
        assert f"eval/robustness/{key}" in m, key
    assert m["eval/robustness/mean_acc1"] == pytest.approx(
        (m["eval/robustness/acc1_gaussian_noise"] + m["eval/robustness/acc1_pixelate"]) / 2)
    details = summary["details"]["robustness"]
    assert details["images"] == 1000 and details["image_size"] == 32 and set(details["corrupt_ms"]) == {
        "gaussian_noise", "pixelate"}
    hits = np.load(details["hits"])
    assert hits["hits"].shape == (1000, 3) and hits["hits"][:, 0].mean() == m["eval/robustness/clean_acc1"]
    report = (out / "eval.md").read_text()
    assert "## pixels" in report and "| gaussian_noise | " in report and "## robustness" in report
