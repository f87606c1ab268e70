"""task=predict and eval=transfer end to end through run.py, from a quick classifier trained here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder
from run_helpers import run, synthetic
from seit.data.dataset_info import TokenDatasetInfo
from seit.models.export import read_classifier

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A token classifier on 3 colour classes (debug=fast): (tmp dir, its image folder, its overrides)."""
    tmp = tmp_path_factory.mktemp("predict_run")
    images = make_image_folder(tmp / "images")
    overrides = [*synthetic(tmp, images), f"data.root={tmp}/ds"]
    run(*overrides)
    return tmp, images, overrides


def test_predict_writes_top_k_with_class_names(trained):
    tmp, images, _ = trained
    export = tmp / "run" / "classifier.safetensors"
    proc = run(f"hydra.run.dir={tmp}/pred", "print_config=false", f"paths.log_dir={tmp}/logs", "task=predict",
               f"task.checkpoint={export}", f"task.images={images}/val",
               f"task.tokenizer={tmp}/ds.tokenizer.safetensors", "task.topk=2", "task.workers=0")
    out = tmp / "pred" / "predictions.csv"
    assert f"predictions: {out}" in proc.stdout
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "rank1_class", "rank1_prob", "rank2_class", "rank2_prob"]
    assert len(rows) == 12 and {r["rank1_class"] for r in rows} <= {"class0", "class1", "class2"}
    right = sum(Path(r["path"]).parent.name == r["rank1_class"] for r in rows)
    assert right >= 8  # 3 colour classes: chance 4 of 12; the model reaches val/acc1 1.0 on these (test_run)
    summary = json.loads((tmp / "pred" / "summary.json").read_text())
    assert summary["num_images"] == 12 and summary["skipped"] == 0 and summary["predictions"] == str(out)
    assert summary["tokenizer"] == f"{tmp}/ds.tokenizer.safetensors"


def test_transfer_fine_tunes_the_body_and_trains_a_baseline(trained):
    """eval=transfer on a 2-class image folder, tokenized with the checkpoint's tokenizer."""
    tmp, _, overrides = trained
    export = tmp / "run" / "classifier.safetensors"
    target = make_image_folder(tmp / "target", classes=2, train=16, val=6)
    run(*overrides, f"hydra.run.dir={tmp}/eval", "task=eval", f"task.checkpoint={export}", "eval=[transfer]",
        f"eval.transfer.data.build.source={target}", "eval.transfer.lr=0.0005")
    summary = json.loads((tmp / "eval" / "summary.json").read_text())
    metrics = summary["metrics"]
    for key in ("acc1", "acc5", "scratch_acc1", "scratch_acc5", "gain_acc1"):
        assert 0 <= metrics[f"eval/transfer/{key}"] + (1 if key == "gain_acc1" else 0) <= 2, key
    assert metrics["eval/transfer/acc1"] >= 0.6  # 2 colour classes: chance 0.5
    runs = summary["details"]["transfer"]["runs"]
    tokens = TokenDatasetInfo.open(tmp / "eval" / "transfer" / "tokens")
    assert tokens.classes == ["class0", "class1"]
    assert tokens.fingerprint == TokenDatasetInfo.open(tmp / "ds").fingerprint  # the checkpoint's tokenizer

    source, meta = read_classifier(export)
    tuned, tuned_meta = read_classifier(runs["pretrained"]["classifier_export"])
    scratch, _ = read_classifier(runs["scratch"]["classifier_export"])
    assert len(meta["classes"]) == 3 and tuned_meta["classes"] == ["class0", "class1"]
    key = "vit.blocks.0.attn.qkv.weight"

    def moved(state):  # relative distance of a body weight from the checkpoint's
        return float((state[key] - source[key]).norm() / source[key].norm())

    assert moved(tuned) < 0.3 and moved(scratch) > 1.0  # 3 steps from the checkpoint vs a random init
    hparams = torch.load(Path(runs["pretrained"]["output_dir"]) / "checkpoints" / "last.ckpt",
                         weights_only=True)["hyper_parameters"]
    assert hparams["model"]["pretrained"] == str(export) and hparams["data"]["num_classes"] == 2
    assert "| pretrained |" in (tmp / "eval" / "eval.md").read_text()
