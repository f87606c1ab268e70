"""Continual learning through run.py as a user runs it: both experiments, the bookkeeping, resume."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import make_image_folder
from run_helpers import run, synthetic

pytestmark = pytest.mark.integration
TASKS = 3


def summary(path) -> dict:
    return json.loads((path / "summary.json").read_text())


def check_protocol(run_dir, budget: int) -> dict:
    """The accuracy matrix, class bookkeeping and memory bytes of a finished run."""
    s = summary(run_dir)
    acc = s["accuracy_matrix"]
    assert len(acc) == TASKS and all(len(row) == TASKS for row in acc)
    for i, row in enumerate(acc):
        assert all(v is None for v in row[i + 1:]) and all(0 <= v <= 1 for v in row[:i + 1])
    assert len(s["seen_accuracy"]) == TASKS and s["final_accuracy"] == s["seen_accuracy"][-1]
    # 1.5x chance (1 / classes seen) after every task: measured >= [1.0, 0.5, 0.5] here, chance [.5, .25, .17]
    assert all(acc > 1.5 / (2 * (t + 1)) for t, acc in enumerate(s["seen_accuracy"])), s["seen_accuracy"]
    assert s["average_incremental_accuracy"] == pytest.approx(sum(s["seen_accuracy"]) / TASKS, abs=1e-5)
    assert "forgetting" in s and sorted(c for t in s["tasks"] for c in t) == list(range(2 * TASKS))
    for t, task in enumerate(s["per_task"]):
        seen = {c for group in s["tasks"][:t + 1] for c in group}
        # nothing from a later task is trained on or evaluated; the task's own classes are trained on
        assert set(s["tasks"][t]) <= set(task["train_classes"]) <= seen
        assert set(task["eval_classes"]) == seen
        mem_dir = run_dir / "tasks" / f"{t:02d}" / "memory"
        stored = sum(p.stat().st_size for p in mem_dir.iterdir() if p.suffix in (".bin", ".logits"))
        assert stored == s["memory"][t]["bytes"] <= budget
        assert set(map(int, s["memory"][t]["per_class"])) <= seen
    assert (run_dir / "accuracy_matrix.png").is_file()
    return s


def token_overrides(tmp_path, images) -> list[str]:
    return ["experiment=continual_tokens", *synthetic(tmp_path, images), f"data.root={tmp_path}/ds",
            "model.depth=1", f"task.num_tasks={TASKS}", "task.memory.budget=1.2KB"]


@pytest.fixture
def images(tmp_path):
    return make_image_folder(tmp_path / "images", classes=2 * TASKS, train=10, val=3, fmt="JPEG")


def test_continual_tokens_and_resume_after_a_task(tmp_path, images):
    first = tmp_path / "first"
    run(*token_overrides(tmp_path, images), f"hydra.run.dir={first}")
    full = check_protocol(first, 1200)
    assert full["representation"] == "tokens" and full["memory"][-1]["exemplars"] > 10

    # a run stopped after task 0: only tasks/00 is there; the relaunch picks up from it
    resumed = tmp_path / "resumed"
    shutil.copytree(first / "tasks" / "00", resumed / "tasks" / "00")
    proc = run(*token_overrides(tmp_path, images), f"hydra.run.dir={resumed}")
    assert "resuming after task 0 of 3" in proc.stdout + proc.stderr
    again = check_protocol(resumed, 1200)
    for key in ("accuracy_matrix", "memory", "class_order"):
        assert again[key] == full[key], key
    # resuming into it with another protocol is refused, not mixed
    proc = run(*token_overrides(tmp_path, images), "task.memory.budget=2KB", f"hydra.run.dir={resumed}", check=False)
    assert proc.returncode != 0 and "another protocol" in proc.stderr


def test_continual_pixels_with_der_and_a_jpeg_memory(tmp_path, images):
    out = tmp_path / "pixels"
    run("experiment=continual_pixels", f"data.source={images}", "data.image_size=16", "model.patch_size=4",
        "aug.crop=12", "debug=fast", "model.depth=1", f"task.num_tasks={TASKS}", "task.method=derpp",
        "task.memory.selection=class_balanced_reservoir", "task.memory.budget=6KB", f"paths.log_dir={tmp_path}/logs",
        f"hydra.run.dir={out}", "print_config=false")
    s = check_protocol(out, 6000)
    assert s["representation"] == "images" and s["method"] == "derpp"
    assert all(m["logit_bytes"] > 0 for m in s["memory"])
    assert list((out / "tasks" / "02" / "memory").glob("*.logits"))
    assert s["memory"][-1]["bytes_per_exemplar"] > 300  # JPEG files, not token chunks


def test_continual_distill_with_reservoir_sampling(tmp_path, images):
    out = tmp_path / "distill"
    run(*token_overrides(tmp_path, images), "task.method=distill", "task.memory.selection=reservoir_sampling",
        f"hydra.run.dir={out}")
    check_protocol(out, 1200)


def test_continual_on_two_ranks_counts_every_val_sample_once(tmp_path, images):
    out = tmp_path / "ddp"
    run(*token_overrides(tmp_path, images), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "task.method=derpp", f"hydra.run.dir={out}")
    s = check_protocol(out, 1200)
    for t in range(TASKS):
        result = json.loads((out / "tasks" / f"{t:02d}" / "result.json").read_text())
        seen = {c for group in s["tasks"][:t + 1] for c in group}
        assert sum(result["eval_total"].values()) == 3 * len(seen)  # 3 val images per class, split over ranks
