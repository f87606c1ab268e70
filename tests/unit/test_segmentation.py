"""eval=segmentation: mIoU with void ignored, masks reduced to the grid, bad masks refused, and a
linear head on a tiny random token model that learns a synthetic segmentation set."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchmetrics
from omegaconf import OmegaConf
from PIL import Image

from seit.data.dataset_info import DatasetError
from seit.data.segmentation import list_pairs, load_split, mask_to_grid
from seit.eval.context import EvalContext
from seit.eval.segmentation import Segmentation
from seit.models.vit import TokenViT
from seit.tasks.checkpoint import vit_model
from seit.tasks.segmentation import SegmentationTask, iou_scores
from seit.tokenizers.patch_kmeans import PatchKMeansTokenizer

COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230]])  # classes 0, 1, 2
VOID = 3


def confusion(pred, target, num_classes: int) -> np.ndarray:
    m = torchmetrics.classification.MulticlassConfusionMatrix(num_classes, ignore_index=num_classes)
    return m(torch.tensor(pred), torch.tensor(target)).numpy()


def test_iou_scores_by_hand_with_void_ignored():
    # void (3) pixels are left out whatever is predicted there
    target = [0, 0, 1, 1, 2, 3, 3, 3]
    pred = [0, 1, 1, 1, 2, 0, 2, 1]
    m = confusion(pred, target, 3)
    assert m.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    s = iou_scores(m)
    # IoU_c = TP / (TP + FP + FN): class 0: 1/(1+0+1); class 1: 2/(2+1+0); class 2: 1/1
    assert np.allclose(s["iou"], [1 / 2, 2 / 3, 1.0])
    assert math.isclose(s["miou"], (1 / 2 + 2 / 3 + 1) / 3)
    assert math.isclose(s["pixel_acc"], 4 / 5) and s["pixels"] == 5
    jaccard = torchmetrics.classification.MulticlassJaccardIndex(3, ignore_index=3, average="none")
    assert np.allclose(jaccard(torch.tensor(pred), torch.tensor(target)).numpy(), s["iou"])


def test_iou_scores_leave_out_a_class_nobody_labels_or_predicts():
    m = confusion([0, 0, 1], [0, 1, 1], 3)  # class 2 nowhere
    s = iou_scores(m)
    assert np.isnan(s["iou"][2])
    assert math.isclose(s["miou"], (1 / 2 + 1 / 2) / 2)
    # a class predicted but never labelled counts, with IoU 0
    s = iou_scores(confusion([0, 2, 1], [0, 1, 1], 3))
    assert s["iou"][2] == 0.0 and math.isclose(s["miou"], (1 + 1 / 2 + 0) / 3)


def test_mask_to_grid_majority_vote_keeps_void_ignored():
    mask = torch.full((1, 2, 8), VOID, dtype=torch.uint8)  # 4 cells of 2x2 pixels
    mask[0, :2, 2] = 1                                      # cell 1: 2 of 4 pixels class 1: a tie goes to the class
    mask[0, 0, 4] = 2                                       # cell 2: 1 class pixel, 3 void: void
    mask[0, :2, 6:] = 0
    mask[0, 0, 7] = 2                                       # cell 3: 3 x class 0, 1 x class 2: class 0
    grid = mask_to_grid(mask, (1, 4), num_classes=3, void=VOID)
    assert grid.tolist() == [[[VOID, 1, VOID, 0]]]          # cell 0 all void: void
    assert grid.dtype == torch.int64
    with pytest.raises(ValueError, match="void=2 must be the label after the 3 classes"):
        mask_to_grid(mask, (1, 4), num_classes=3, void=2)


def test_void_cells_do_not_train_the_head():
    """The loss of a batch does not depend on the logits at void cells, and an all-void batch trains nothing."""
    task = SegmentationTask(head="linear", mode="frozen", dim=4, num_classes=3,
                            data={"kind": "images", "num_classes": 3, "input_grid": 4, "batch_size": 2},
                            optim={}, hflip=False)
    feats = torch.randn(2, 4, 4, 4)
    task.set_backbone(torch.nn.Identity(), lambda x: x)
    target = torch.randint(0, 3, (2, 4, 4))
    target[:, :2] = VOID
    changed = feats.clone()
    changed[:, :, :2] = torch.randn(2, 4, 2, 4) * 10  # only the void rows differ
    task.head.eval()
    loss = task.training_step({"x": feats, "target": target}, 0)
    assert torch.allclose(loss, task.training_step({"x": changed, "target": target}, 0))
    empty = task.training_step({"x": feats, "target": torch.full_like(target, VOID)}, 0)
    empty.backward()
    assert empty.item() == 0.0 and all(float(p.grad.abs().sum()) == 0.0 for p in task.head.parameters())


# -- the files ---------------------------------------------------------------------------------
def write_set(root: Path, *, train: int = 8, val: int = 4, size: int = 32, seed: int = 0) -> Path:
    """A CamVid-like set: each 8x8 block one of 3 colours (its class) or grey (void), plus noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            blocks = rng.integers(0, 4, (size // 8, size // 8))
            blocks[0, 0], blocks[0, 1], blocks[1, 0] = 0, 1, 2  # every class in every image
            mask = np.kron(blocks, np.ones((8, 8), np.int64)).astype(np.uint8)
            colour = np.concatenate([COLOURS, [[128, 128, 128]]])[mask]
            image = np.clip(colour + rng.normal(0, 12, colour.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{split}_{i:03d}.png")
            Image.fromarray(mask, "L").save(root / split / "masks" / f"{split}_{i:03d}.png")
    return root


def test_loader_refuses_bad_masks_naming_the_file(tmp_path):
    root = write_set(tmp_path / "seg", train=2, val=1)
    split = load_split(root, "train", (16, 24), void=VOID)
    assert split.images.shape == (2, 3, 16, 24) and split.images.dtype == torch.uint8
    assert split.masks[0].shape == (32, 32) and split.names == ["train_000", "train_001"]

    bad = root / "train" / "masks" / "train_001.png"
    Image.fromarray(np.zeros((32, 30), np.uint8), "L").save(bad)  # 30 wide, the image 32
    with pytest.raises(DatasetError, match=r"mask .*train_001\.png is 30x32, its image train_001\.png 32x32"):
        load_split(root, "train", (16, 16), void=VOID)
    Image.fromarray(np.full((32, 32), 7, np.uint8), "L").save(bad)
    with pytest.raises(DatasetError, match=r"mask .*train_001\.png holds label 7, above void=3"):
        load_split(root, "train", (16, 16), void=VOID)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(bad)
    with pytest.raises(DatasetError, match=r"mask .*train_001\.png has mode RGB"):
        load_split(root, "train", (16, 16), void=VOID)
    bad.unlink()
    with pytest.raises(DatasetError, match=r"image .*train_001\.png has no mask .*masks/train_001\.png"):
        list_pairs(root, "train")
    with pytest.raises(DatasetError, match=r"eval\.segmentation\.root: .*nowhere not found"):
        list_pairs(tmp_path / "nowhere", "train")


# -- learning ----------------------------------------------------------------------------------
def context(tmp_path: Path, model, tokenizer=None) -> EvalContext:
    cfg = OmegaConf.create({
        "seed": 0, "data": {"kind": "tokens" if tokenizer is not None else "images"}, "task": {"batch_size": 8},
        "optim": {"_target_": "seit.tasks.optim.create_optimizer", "_partial_": True, "opt": "adamw", "lr": None,
                  "blr": 5e-4, "base_batch": 512, "weight_decay": 0.0},
        "scheduler": {"_target_": "seit.tasks.schedule.warmup_cosine", "_partial_": True, "warmup_epochs": 1,
                      "min_lr": 1e-5}})
    return EvalContext(cfg=cfg, model=model, device=torch.device("cpu"), output_dir=tmp_path / "eval",
                       _tokenizer=tokenizer)


def token_model(root: Path):
    """A random tiny ViT on the ids of a k-means patch tokenizer fitted on the train images."""
    torch.manual_seed(0)
    images = load_split(root, "train", (32, 32), void=VOID).images.float() / 255
    tokenizer = PatchKMeansTokenizer.fit(images, patch_size=4, codebook_size=16, codebook_dim=8, max_patches=10_000,
                                         iters=10, seed=0)
    net = TokenViT(input="tokens", input_size=8, num_classes=3, embed_dim=32, depth=1, num_heads=2,
                   codebook_size=16, codebook_dim=8)
    net.embed.load_codebook(tokenizer.codebook)
    return vit_model("classifier", net, root / "random.ckpt", crop=0, fingerprint=None, num_classes=3), tokenizer


def test_linear_head_on_a_random_token_model_learns_the_synthetic_set(tmp_path):
    root = write_set(tmp_path / "seg")
    model, tokenizer = token_model(root)
    evaluator = Segmentation(str(root), runs=["linear_frozen"], width=32, height=32, epochs=25, batch_size=4,
                             lr=0.05, num_classes=3, classes=["red", "green", "blue"])
    result = evaluator(context(tmp_path, model, tokenizer))
    miou = result.metrics["miou/linear_frozen"]
    # the untrained head (lr 1e-9) scores 0.26, this one 0.83 (measured)
    assert miou > 0.6, result.details
    assert result.metrics["pixel_acc/linear_frozen"] > 0.75
    run = tmp_path / "eval" / "segmentation" / "linear_frozen"
    assert (run / "confusion.csv").read_text().splitlines()[0] == "true\\pred,red,green,blue"
    assert (run / "scores.json").is_file() and (run / "metrics.csv").is_file() and (run / "predictions.png").is_file()
    assert result.details["runs"]["linear_frozen"]["output_grid"] == [4, 4]  # 32 px / (4 px tokens x stem 2)
    titles = [t.title for t in result.tables]
    assert any("per-class IoU" in t for t in titles) and result.tables[1].header == ["class", "linear_frozen"]


def test_finetune_and_decoder_leave_the_evaluated_model_as_it_was(tmp_path):
    """A pixel model: the decoder head fine-tunes the backbone, which is restored afterwards."""
    root = write_set(tmp_path / "seg", train=4, val=2)
    torch.manual_seed(0)
    net = TokenViT(input="pixels", input_size=32, num_classes=3, embed_dim=16, depth=1, num_heads=2, patch_size=8)
    model = vit_model("classifier", net, root / "pixels.ckpt", crop=0, fingerprint=None, num_classes=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    evaluator = Segmentation(str(root), runs=["decoder_finetune"], width=32, height=16, epochs=1, batch_size=2,
                             num_classes=3, decoder_width=8)
    result = evaluator(context(tmp_path, model))
    assert 0.0 <= result.metrics["miou/decoder_finetune"] <= 1.0
    assert result.details["runs"]["decoder_finetune"]["output_grid"] == [8, 4]  # 2 x the 4x2 feature grid (w x h)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net.training and all(p.requires_grad for p in net.parameters())

    with pytest.raises(ValueError, match=r"width/height=36x16 must be multiples of 8, the model's input stride "
                                         r"\(patch size 8\)"):
        Segmentation(str(root), runs=["linear_frozen"], width=36, height=16, num_classes=3)(context(tmp_path, model))
    with pytest.raises(ValueError, match="'linear_frozn' is not <head>_<mode>"):
        Segmentation(str(root), runs=["linear_frozn"])
