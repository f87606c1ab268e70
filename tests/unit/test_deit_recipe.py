"""DeiT's pixel recipe (aug=deit): RandAugment in the loader, random erasing on the device, the
repeated-augmentation sampler, and the refusal of these pixel-only keys on token data."""

from __future__ import annotations

import random
from collections import Counter
from itertools import groupby

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import make_image_folder
from seit.augment.pipeline import AugConfig, augment_pixels, random_erasing
from seit.data.image_datamodule import ImageFolderDataModule
from seit.data.image_source import load_image
from seit.tasks.classification import ClassificationTask

DEIT_RA = "rand-m9-mstd0.5-inc1"


def datamodule(root, **aug) -> ImageFolderDataModule:
    cfg = OmegaConf.create({"source": str(root), "image_size": 16, "train_split": "train", "val_split": "val",
                            "batch_size": 8, "eval_batch_size": 8, "num_workers": 0, "pin_memory": False})
    return ImageFolderDataModule(cfg, cache_dir=str(root / "cache"), **aug)


def seeded_items(dataset, seed: int, n: int = 6) -> list[torch.Tensor]:
    random.seed(seed)
    np.random.seed(seed)
    return [dataset[i]["images"] for i in range(n)]


def test_randaugment_changes_training_images_deterministically_and_leaves_val_alone(tmp_path):
    dm = datamodule(make_image_folder(tmp_path / "img", classes=2, train=3, val=3), auto_augment=DEIT_RA)
    train, val = dm.train_dataloader().dataset, dm.val_dataloader().dataset
    plain = [torch.from_numpy(load_image(r, 16)) for r in train.records[:6]]
    first, again, other = seeded_items(train, 0), seeded_items(train, 0), seeded_items(train, 1)
    assert all(a.shape == (3, 16, 16) and a.dtype == torch.uint8 for a in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # a fixed seed repeats the ops
    assert sum(not torch.equal(a, p) for a, p in zip(first, plain)) >= 4  # RandAugment changed the images
    assert any(not torch.equal(a, b) for a, b in zip(first, other))
    assert val.transform is None
    assert all(torch.equal(val[i]["images"], torch.from_numpy(load_image(r, 16))) for i, r in enumerate(val.records))


def test_bad_loader_keys_are_refused_with_the_key(tmp_path):
    root = make_image_folder(tmp_path / "img", classes=2, train=1, val=1)
    with pytest.raises(ValueError, match="aug.auto_augment='rand-x9'"):
        datamodule(root, auto_augment="rand-x9")
    with pytest.raises(ValueError, match="aug.repeated_aug=0"):
        datamodule(root, repeated_aug=0)
    with pytest.raises(ValueError, match="aug.random_erasing takes keys"):
        AugConfig.from_dict({"random_erasing": 0.25})


def test_repeat_sampler_gives_each_drawn_image_three_times_in_an_epoch_of_dataset_length(tmp_path):
    dm = datamodule(make_image_folder(tmp_path / "img", classes=3, train=100, val=1, size=4), repeated_aug=3)
    loader = dm.train_dataloader()
    size = len(loader.dataset)
    epoch0 = list(loader.sampler)
    assert 0.8 * size <= len(epoch0) <= size  # timm: the dataset's length rounded down to 256
    assert len(epoch0) == 256
    runs = [(i, len(list(g))) for i, g in groupby(epoch0)]
    assert all(n == 3 for _, n in runs[:-1]) and 1 <= runs[-1][1] <= 3  # copies in a row (one device)
    assert set(Counter(epoch0).values()) <= {1, 2, 3} and sum(c == 3 for c in Counter(epoch0).values()) == 85
    loader.sampler.set_epoch(1)
    assert list(loader.sampler) != epoch0  # Lightning's set_epoch reshuffles
    assert len(loader) == 256 // 8
    plain = datamodule(tmp_path / "img").train_dataloader()
    assert not hasattr(plain.sampler, "num_repeats") and len(plain.sampler) == size


def test_random_erasing_erases_a_quarter_of_the_batch_reproducibly_without_touching_global_rngs():
    cfg = AugConfig.from_dict({"random_erasing": {"prob": 0.25}})
    images = torch.zeros(800, 3, 16, 16, dtype=torch.uint8)
    labels = torch.zeros(800, dtype=torch.long)
    random.seed(5)
    torch.manual_seed(5)
    x, _ = augment_pixels(images, labels, lambda im: im.float(), cfg, 2, 0.0, torch.Generator().manual_seed(3))
    after = (random.random(), torch.rand(1))
    random.seed(5)
    torch.manual_seed(5)
    assert after == (random.random(), torch.rand(1))  # timm's draws left the global RNGs as they were
    erased = (x != 0).flatten(1).any(1)
    assert abs(erased.float().mean().item() - 0.25) < 0.06
    boxes = (x[erased] != 0).flatten(1).float().mean(1)  # pixel mode: N(0,1) noise over 2-33% of the image
    assert boxes.min() > 0.005 and boxes.max() < 0.4
    same = random_erasing(torch.zeros(800, 3, 16, 16), cfg.random_erasing, torch.Generator().manual_seed(3))
    other = random_erasing(torch.zeros(800, 3, 16, 16), cfg.random_erasing, torch.Generator().manual_seed(4))
    assert torch.equal(same, x) and not torch.equal(other, x)
    off, _ = augment_pixels(images, labels, lambda im: im.float(), AugConfig(), 2, 0.0, torch.Generator())
    assert not off.any()


def classification(kind: str, aug: dict) -> ClassificationTask:
    tokens = kind == "tokens"
    model = {"_target_": "seit.models.vit.TokenViT", "input": "tokens" if tokens else "pixels", "embed_dim": 16,
             "depth": 1, "num_heads": 2, **({} if tokens else {"patch_size": 4})}
    data = {"kind": kind, "num_classes": 3, "input_grid": 8 if tokens else 16, "batch_size": 4,
            **({"codebook_size": 16, "codebook_dim": 4} if tokens else {})}
    return ClassificationTask(model=model, aug=aug, data=data,
                              optim={"_target_": "seit.tasks.optim.create_optimizer", "_partial_": True, "lr": 1e-3})


@pytest.mark.parametrize("aug, key", [({"auto_augment": DEIT_RA}, "aug.auto_augment"),
                                      ({"random_erasing": {"prob": 0.25}}, "aug.random_erasing.prob"),
                                      ({"repeated_aug": 3}, "aug.repeated_aug")])
def test_token_data_refuses_the_pixel_only_keys(aug, key):
    with pytest.raises(ValueError, match=f"{key}.*work on pixels"):
        classification("tokens", aug)
    deit = {"auto_augment": DEIT_RA, "random_erasing": {"prob": 0.25}, "repeated_aug": 3}
    assert classification("images", deit).aug.pixel_only() == ["auto_augment", "random_erasing.prob", "repeated_aug"]


@pytest.mark.parametrize("policy", ["rand-n1-m10-inc1", "v0"])
def test_posterize_to_zero_bits_gives_a_black_image_instead_of_a_pillow_error(tmp_path, policy):
    """Pillow 13 refuses 0 bits, which timm asks for at the top (inc1) or bottom (v0) of the magnitude range."""
    from seit.data.image_datamodule import auto_augment_transform

    transform = auto_augment_transform(policy, 16)
    image = Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8))
    random.seed(0)
    np.random.seed(0)
    outs = [np.asarray(transform(image)) for _ in range(300)]
    assert all(o.shape == (16, 16, 3) for o in outs)
    if policy.startswith("rand"):
        assert any(not o.any() for o in outs)  # posterize kept 0 bits
