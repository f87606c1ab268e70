"""experiments/gpu_suite.py --smoke: every stage runs (or says why not) and the report is written.

The suite makes its own toy data (synthetic JPEGs, a k-means token dataset, a small VQGAN), so the
test needs neither ../shared nor a GPU. On this CPU the GPU tokenize row must say it had no CUDA
device, and the MFU must be null; the long schedules either finish their toy runs or name what cut them.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import REPO
from fork_server import FORK_SERVER, env

STAGES = ("throughput", "tokenize", "loader", "long_mtm", "long_ablation", "long_continual")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    hide_gpus = {"CUDA_VISIBLE_DEVICES": ""} if torch.cuda.is_available() else {}  # else the fork server's python
    proc = subprocess.run([FORK_SERVER.python(), "experiments/gpu_suite.py", "--smoke", "--budget", "100", "--out", str(out)],
                          cwd=REPO, env=env(**hide_gpus), capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_suite.json").read_text()), proc


def test_every_stage_has_numbers_or_a_reason(smoke):
    out, report, _ = smoke
    assert set(STAGES) <= set(report["stages"])
    for name in STAGES:
        stage = report["stages"][name]
        assert stage["status"] in ("ok", "partial", "skipped", "failed"), (name, stage)
        if stage["status"] != "ok":
            assert stage.get("reason"), f"{name}: {stage['status']} without a reason"
        assert stage["status"] != "failed", (name, stage.get("reason"), stage.get("log_tail"))
    assert report["wall_s"] <= report["budget_s"] + 15, "the suite ran past its budget"


def rows_ok_or_explained(rows: dict) -> list[dict]:
    """The rows that measured something; every other row must say why it did not."""
    for key, row in rows.items():
        assert row["status"] in ("ok", "skipped", "failed"), (key, row)
        if row["status"] != "ok":
            assert row.get("reason"), (key, row)
    return [r for r in rows.values() if r["status"] == "ok"]


def test_measured_rows_are_numbers(smoke):
    """A loaded machine may cut the later rows short (with a reason); the first row always fits."""
    _, report, _ = smoke
    rows = report["stages"]["throughput"]["rows"]
    assert set(rows) == {"tokens", "pixels", "pixels_jpeg"}
    assert rows["tokens"]["status"] == "ok", rows["tokens"]
    assert rows["tokens"]["flops_per_img"] > 0
    for row in rows_ok_or_explained(rows):
        assert row["img_per_s"] > 0 and row["step_ms"] > 0
        assert row["mfu"] is None  # no GPU peak on a CPU
    tok = report["stages"]["tokenize"]["rows"]
    assert tok["gpu"]["status"] == "skipped" and "CUDA" in tok["gpu"]["reason"]
    for row in rows_ok_or_explained(tok):
        assert row["img_per_s"] > 0 and row["images"] == 5 and row["small_images"] == 1
    loader = report["stages"]["loader"]["rows"]
    assert "no time" in loader["in200_patch_kmeans_s256p8k512"]["reason"] or \
        "not found" in loader["in200_patch_kmeans_s256p8k512"]["reason"]  # smoke data has no 32x32 set
    for row in rows_ok_or_explained(loader):
        assert row["samples_per_s"] > 0 and row["workers"] == 2
    for name in STAGES[3:]:
        for run in report["stages"][name].get("runs", []):
            assert run["state"], run
            if run["state"] == "finished":
                assert any(k in run for k in ("val/acc1", "val/mtm_acc", "final_accuracy")), run


def test_markdown_and_skips_are_reported(smoke):
    out, report, proc = smoke
    md = (out / "gpu_suite.md").read_text()
    for title in ("1. Train throughput", "2. Tokenize", "3. Token loader", "4a. MTM", "4b. Augmentation", "4c. Class"):
        assert title in md
    assert "| token ViT-B |" in md
    for line in report["skipped"]:
        assert line.split(":")[0] in STAGES
    assert "gpu: no CUDA device" in md and "gpu_suite.md" in proc.stdout
