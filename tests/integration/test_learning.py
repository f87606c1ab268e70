"""Learning happens, through run.py as a user runs it: ``debug=overfit`` memorises its fixed batches
(tokens and pixels), MTM pre-training and the VQ tokenizer drive their losses down.

The factors asserted below were measured on a 2-core CPU (numbers in each docstring); the runs are
seeded, so a change that breaks learning fails them rather than making them flaky.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import on_quickstart_data
from run_helpers import run

pytestmark = pytest.mark.integration


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def logged(run_dir: Path, key: str) -> list[float]:
    """Every value of ``key`` the CSV logger wrote, in step order."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


def test_overfit_memorises_its_batches_on_tokens(quickstart, tmp_path):
    """debug=overfit on the quickstart tokens: the same 16 digits every epoch, validated on themselves.
    Measured: val/acc1 = 1.0 from epoch 19 of 40 on (0.19 after the first epoch), val/loss 0.09 at the end."""
    run(*on_quickstart_data(quickstart[0], tmp_path), "debug=overfit")
    s = summary(tmp_path / "run")
    assert s["metrics"]["val/samples"] == 16  # the 2 fixed batches of 8, not the 1,000 val digits
    assert s["val/acc1"] >= 0.95, s["metrics"]
    assert s["global_step"] == 40 * 2


def test_overfit_memorises_its_batches_on_pixels(quickstart, tmp_path):
    """The same on the MNIST pixels (micro ViT, 4 px patches). Measured: val/acc1 = 1.0 from epoch 20 of 40."""
    run(*on_quickstart_data(quickstart[0], tmp_path), "debug=overfit", "data=images_mnist5k", "model.input=pixels",
        "model.patch_size=4")
    s = summary(tmp_path / "run")
    assert s["metrics"]["val/samples"] == 16
    assert s["val/acc1"] >= 0.95, s["metrics"]


def test_mtm_pretraining_drives_its_loss_down(quickstart, tmp_path):
    """task=pretrain_mtm on the quickstart tokens: a 2-block micro encoder, a 1-block decoder, 100 steps of
    16 digits at lr 1e-2. The loss starts at ln(K) and falls slowly: the logits are the dot product with
    the (small at init, detached) id embedding plus a bias, which the first steps move little.
    Measured: train/loss 5.43 -> 4.68 (mean of the last 5 steps), a factor 0.86; val/mtm_acc 0.61."""
    run(*on_quickstart_data(quickstart[0], tmp_path), "task=pretrain_mtm", "debug=fast", "optim.lr=1e-2",
        "task.decoder.decoder_dim=64", "task.decoder.decoder_depth=1", "task.decoder.decoder_heads=4",
        "trainer.max_epochs=4", "trainer.limit_train_batches=25")
    loss = logged(tmp_path / "run", "train/loss")
    assert len(loss) == 100
    assert sum(loss[-5:]) / 5 <= 0.9 * loss[0], loss


def test_tokenizer_training_drives_its_reconstruction_loss_down(quickstart, tmp_path):
    """task=train_tokenizer, a tiny VQ model (16 codes) on the MNIST digits at 16 px, 50 steps of 16.
    Measured: train/l1 + train/l2 0.697 -> 0.178 (mean of the last 5 steps), a factor 0.26."""
    run(*on_quickstart_data(quickstart[0], tmp_path), "task=train_tokenizer", "data=images_mnist5k",
        "data.image_size=16", "tokenizer=vq", "tokenizer.image_size=16", "tokenizer.model.ch=8",
        "tokenizer.model.ch_mult=[1,2]", "tokenizer.model.codebook_size=16", "tokenizer.model.codebook_dim=4",
        "optimized_metric=val/psnr", "optim.lr=1e-3", "debug=fast", "trainer.max_epochs=2",
        "trainer.limit_train_batches=25")
    run_dir = tmp_path / "run"
    recon = [a + b for a, b in zip(logged(run_dir, "train/l1"), logged(run_dir, "train/l2"))]
    assert len(recon) == 50
    assert sum(recon[-5:]) / 5 <= 0.35 * recon[0], recon
