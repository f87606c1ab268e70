"""trainer.max_time through run.py: a multirun of two seeds, each stopped by a 4 s training budget with
a validation every second of training; each run dir and the sweep dir get their time curves."""

from __future__ import annotations

import json

from PIL import Image

from conftest import make_image_folder
from run_helpers import run, synthetic

BUDGET_S = 4.0


def valid_png(path) -> bool:
    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG"


def test_two_seeds_stop_at_their_budget_with_a_curve_each_and_one_sweep_figure(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=3, train=32, val=4)  # 24 steps an epoch
    proc = run("-m", *synthetic(tmp_path, images), f"data.root={tmp_path}/ds", f"hydra.sweep.dir={tmp_path}/sweep",
               "trainer.max_epochs=1000", "trainer.limit_train_batches=null", "data.batch_size=4",
               "trainer.max_time=00:00:00:04", "callbacks.budget.val_every=1", "seed=0,1")
    assert "Ignoring `Trainer(max_time" not in proc.stdout + proc.stderr  # the budget is the only Timer

    for job in ("0", "1"):
        summary = json.loads((tmp_path / "sweep" / job / "summary.json").read_text())
        budget, curve = summary["budget"], summary["curve"]
        assert budget["stopped_by_budget"] and budget["max_time_s"] == BUDGET_S
        assert budget["excluded"] == ["validation", "checkpointing"] and budget["validation_s"] > 0
        step_s = budget["train_seconds"] / summary["global_step"]
        # it stops at the step that crosses the budget (measured: 4.00-4.02 s, steps of ~20 ms)
        assert BUDGET_S <= budget["train_seconds"] <= BUDGET_S + 3 * step_s + 0.5  # 0.5: a stalled step
        assert summary["train_s"] == budget["train_seconds"]  # one launch: the same clock

        assert len(curve) >= 4 and all({"train_s", "samples_seen", "epoch", "step", "val/acc1"} <= set(p) for p in curve)
        times = [p["train_s"] for p in curve]
        assert times == sorted(times) and curve[-1]["step"] == summary["global_step"]  # the final weights scored
        assert [p["samples_seen"] for p in curve] == sorted(p["samples_seen"] for p in curve)
        # each second of the grid is scored within a few steps, mid-epoch (val_every=1) unless the
        # second ends on an epoch's last step (1 in 24), where the epoch's own validation scores it
        window = [(k, k + 3 * step_s + 0.5) for k in (1, 2, 3)]
        assert all(any(lo <= t <= hi for t in times) for lo, hi in window), (window, times)
        mid_epoch = [p for p in curve[:-1] if p["step"] % (3 * 32 // 4)]  # not an epoch's end
        assert mid_epoch and all(any(lo <= p["train_s"] <= hi for lo, hi in window) for p in mid_epoch), mid_epoch
        assert summary["curve_png"].endswith("accuracy_vs_time.png") and valid_png(summary["curve_png"])

    assert valid_png(tmp_path / "sweep" / "accuracy_vs_time.png")
    assert f"sweep curves: {tmp_path / 'sweep' / 'accuracy_vs_time.png'}" in proc.stdout
