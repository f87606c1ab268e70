"""The augmentation recipes and TokenAdapt through run.py, as a user runs them, on tiny data."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_image_folder
from run_helpers import paths, run, synthetic

pytestmark = pytest.mark.integration


def summary(tmp_path, run_dir: str = "run") -> dict:
    return json.loads((tmp_path / run_dir / "summary.json").read_text())


def test_seit_augmentations_then_tokenadapt_then_seitpp(tmp_path):
    images = make_image_folder(tmp_path / "images", train=16, val=6)
    ds = f"data.root={tmp_path}/ds"
    # SeiT's recipe: EDA (with the dataset's synonyms), Token-RRC, noise, CutMix
    run(*synthetic(tmp_path, images), ds, "aug=seit", "aug.crop=6", "data.build.synonyms_k=3")
    s = summary(tmp_path)
    assert s["global_step"] == 3 and 0.6 <= s["metrics"]["val/acc1"] <= 1  # 3 colour classes: chance 1/3, measured 1.0
    hparams = torch.load(s["ckpt_path"], weights_only=True)["hyper_parameters"]
    assert hparams["aug"]["eda"]["replace_prob"] == 0.25 and hparams["aug"]["mix"]["cutmix_alpha"] == 1.0

    # TokenAdapt for that dataset's tokenizer, from the pixels
    run(*paths(tmp_path), "task=train_tokenadapt", "data=images", f"data.source={images}", "data.image_size=16",
        f"task.tokenizer={tmp_path}/ds.tokenizer.safetensors", "task.out_grid=6", "task.width=16", "task.heads=2",
        "optim.lr=1e-3", "debug=fast", f"hydra.run.dir={tmp_path}/run_ta")  # a run dir per job: ckpt_path=last
    ta = summary(tmp_path, "run_ta")
    checkpoint = ta["tokenadapt_checkpoint"]
    assert 0 <= ta["metrics"]["val/agree_tokenadapt"] <= 1 and 0 <= ta["metrics"]["val/agree_naive"] <= 1

    # SeiT++'s schedule: half the batch through the frozen TokenAdapt, noise / ColorAdapt, CutMix
    run(*synthetic(tmp_path, images), ds, "aug=seitpp", "aug.crop=6", f"aug.tokenadapt.checkpoint={checkpoint}",
        "data.build.synonyms_k=3", f"hydra.run.dir={tmp_path}/run_pp")  # the dataset's build settings, or refused
    s = summary(tmp_path, "run_pp")
    state = torch.load(s["ckpt_path"], weights_only=True)["state_dict"]
    assert any(k.startswith("tokenadapt.") for k in state) and s["global_step"] == 3
    assert s["metrics"]["val/acc1"] > 0.45  # chance 1/3; measured 0.67


def test_tokenadapt_of_another_codebook_is_refused(tmp_path):
    images = make_image_folder(tmp_path / "images", train=16, val=6)
    run(*synthetic(tmp_path, images), "task=tokenize", f"data.root={tmp_path}/a")
    run(*synthetic(tmp_path, images, seed=1, codebook_size=16), "task=tokenize", f"data.root={tmp_path}/b")
    run(*paths(tmp_path), "task=train_tokenadapt", "data=images", f"data.source={images}", "data.image_size=16",
        f"task.tokenizer={tmp_path}/a.tokenizer.safetensors", "task.out_grid=6", "task.width=16", "task.heads=2",
        "optim.lr=1e-3", "debug=fast")
    checkpoint = summary(tmp_path)["tokenadapt_checkpoint"]
    proc = run(*synthetic(tmp_path, images, seed=1, codebook_size=16), f"data.root={tmp_path}/b",
               f"aug.tokenadapt.checkpoint={checkpoint}", f"hydra.run.dir={tmp_path}/run_b", check=False)
    assert proc.returncode != 0 and "trained on codebook" in proc.stderr
