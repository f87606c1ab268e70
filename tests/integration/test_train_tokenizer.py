"""task=train_tokenizer end to end: train a tiny VQ tokenizer, then tokenize with it."""

from __future__ import annotations

import json

import pytest

from conftest import make_image_folder
from run_helpers import paths, run
from seit.data.dataset_info import TokenDatasetInfo

pytestmark = pytest.mark.integration
TINY_VQ = ["tokenizer=vq", "tokenizer.image_size=16", "tokenizer.model.ch=8", "tokenizer.model.ch_mult=[1,2]",
           "tokenizer.model.codebook_size=16", "tokenizer.model.codebook_dim=4"]


def test_train_tokenizer_then_tokenize_with_it(tmp_path):
    images = make_image_folder(tmp_path / "images")
    run("task=train_tokenizer", *paths(tmp_path), *TINY_VQ, "data=images", f"data.source={images}",
        "data.image_size=16", "optimized_metric=val/psnr", "optim.lr=0.001", "debug=fast")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "train_tokenizer" and summary["val/psnr"] > 0 and 0 <= summary["val/ssim"] <= 1
    assert list((tmp_path / "run" / "reconstructions").glob("epoch_*.png"))
    checkpoint = summary["tokenizer_checkpoint"]
    k = summary["codebook_size"]  # compacted to the codes used on val
    assert 1 <= k <= 16 and summary["metrics"]["val/codes_used"] == k

    run("task=tokenize", *paths(tmp_path), *TINY_VQ, f"tokenizer.checkpoint={checkpoint}", f"data.root={tmp_path}/ds",
        f"data.build.source={images}", "data.build.workers=0", f"data.build.synonyms_k={min(3, k - 1)}")
    info = TokenDatasetInfo.open(tmp_path / "ds")
    assert info.grid == (8, 8) and info.codebook_size == k and info.meta["tokenizer"]["kind"] == "vq"
    assert info.num_samples("train") == 36
    if k > 1:
        assert info.load_synonyms().shape == (k, min(3, k - 1))


def test_vq_tokenize_without_checkpoint_says_what_to_do(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=2, train=2, val=1)
    proc = run("task=tokenize", *paths(tmp_path), *TINY_VQ, f"data.root={tmp_path}/ds", f"data.build.source={images}",
               check=False)
    assert proc.returncode != 0 and "task=train_tokenizer" in proc.stderr


def test_tokenize_with_a_taming_vqgan_checkpoint(tmp_path):
    import torch

    from seit.tokenizers.taming_vqgan import TamingVQGAN

    tiny = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], in_channels=3, out_ch=3,
                resolution=16, z_channels=4, double_z=False, dropout=0.0, n_embed=16, codebook_dim=4)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": TamingVQGAN(tiny).state_dict()}, ckpt)
    images = make_image_folder(tmp_path / "images", classes=2, train=3, val=1)
    overrides = [f"tokenizer.{k}={v}".replace(" ", "") for k, v in tiny.items()]
    run("task=tokenize", *paths(tmp_path), "tokenizer=taming_vqgan", f"tokenizer.checkpoint={ckpt}",
        "tokenizer.image_size=16", *overrides, f"data.root={tmp_path}/ds", f"data.build.source={images}",
        "data.build.workers=0")
    info = TokenDatasetInfo.open(tmp_path / "ds")
    assert info.grid == (8, 8) and info.codebook_size == 16 and info.meta["tokenizer"]["kind"] == "taming_vqgan"
    assert (tmp_path / "ds.tokenizer.safetensors").is_file()  # converted once, reused on resume and by workers
