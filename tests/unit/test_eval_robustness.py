"""eval=pixels and eval=robustness on a tiny tokenized image folder, through EvalContext directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from conftest import make_image_folder, tokenize_config
from seit.data.dataset_info import TokenDatasetInfo
from seit.data.shard_reader import read_split
from seit.eval.context import EvalContext
from seit.eval.corruptions import CORRUPTIONS, CorruptionError, corrupt_image, resolve
from seit.eval.pixels import Pixels
from seit.eval.robustness import Robustness, class_balanced
from seit.tasks.checkpoint import LoadedModel
from seit.utils.validate import ConfigError

SIZE = 32  # imagecorruptions' smallest side
CLASSES = 3


class NearestMean(nn.Module):
    """Class scores = minus the distance of an input's mean embedding to each class's mean: a model
    that classifies the colour-coded test images well, and that corruptions can fool."""

    def __init__(self, embed, prototypes: torch.Tensor):
        super().__init__()
        self.embed, self.prototypes = embed, prototypes

    def forward(self, x):
        return -torch.cdist(self.embed(x), self.prototypes)


def token_embed(codebook: torch.Tensor):
    return lambda ids: codebook[ids.long()].mean((1, 2))


def pixel_embed(images: torch.Tensor) -> torch.Tensor:
    return images.float().mean((2, 3)) / 255


def loaded(net: nn.Module, input: str, fingerprint: str | None = None) -> LoadedModel:
    return LoadedModel(kind="classifier", input=input, net=net, path=Path(f"toy_{input}.ckpt"),
                       dim=net.prototypes.shape[1], fingerprint=fingerprint, num_classes=CLASSES,
                       _features=net.embed, _logits=net)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A 32 px, 3-class image folder (12 train, 4 val images a class), tokenized (patch k-means, 8x8 grids)."""
    from seit.pipelines import tokenize as tok

    tmp = tmp_path_factory.mktemp("robust")
    images = make_image_folder(tmp / "images", size=SIZE, classes=CLASSES)
    cfg = tokenize_config(images, tmp / "ds")
    cfg.tokenizer.image_size = SIZE
    tok.tokenize(cfg)
    info = TokenDatasetInfo.open(tmp / "ds")
    codebook = info.load_codebook().float()
    ids, labels, _ = read_split(info, "train")
    embed = token_embed(codebook)
    feats = embed(torch.from_numpy(ids.astype(np.int64)))
    prototypes = torch.stack([feats[torch.from_numpy(labels) == c].mean(0) for c in range(CLASSES)])
    return tmp, images, info, NearestMean(embed, prototypes)


def context(tmp: Path, cfg: dict, model: LoadedModel, out: str, rank: int = 0, world: int = 1) -> EvalContext:
    base = {"data": {"kind": "tokens", "root": None, "source": None, "image_size": SIZE},
            "task": {"batch_size": 5, "split": "val", "tokenizer": None}, "paths": {"cache_dir": str(tmp / "cache")}}
    conf = OmegaConf.merge(base, cfg)
    return EvalContext(cfg=conf, model=model, device=torch.device("cpu"), output_dir=tmp / out, rank=rank, world=world)


def token_context(tokens, out: str, **kw) -> EvalContext:
    tmp, _, info, net = tokens
    return context(tmp, {"data": {"root": str(info.root)}}, loaded(net, "tokens", info.fingerprint), out, **kw)


# -- eval=pixels ---------------------------------------------------------------------------------
def test_image_files_tokenized_now_score_exactly_as_the_pre_tokenized_split(tokens):
    result = Pixels(workers=0)(token_context(tokens, "pixels"))
    m = result.metrics
    assert m["samples"] == 4 * CLASSES
    assert m["acc1"] == m["tokens_acc1"] and m["acc3"] == m["tokens_acc3"] and m["acc1_diff"] == 0
    assert m["ids_equal"] == 1 and m["id_agreement"] == 1 and m["pred_agreement"] == 1 and m["max_logit_diff"] == 0
    assert m["acc1"] >= 0.75  # the toy model works, so equality is not two zeros
    assert result.tables[0].rows[2][2:] == [0.0, 0.0]


def test_pixels_names_images_changed_since_tokenize(tokens, tmp_path):
    tmp, images, info, net = tokens
    import shutil

    copy = tmp_path / "images"
    shutil.copytree(images, copy)
    victim = sorted((copy / "val" / "class0").iterdir())[0]
    rng = np.random.default_rng(1)
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(victim)
    ctx = token_context(tokens, "changed")
    ctx._info = TokenDatasetInfo.open(info.root)
    ctx._info.meta["source"] = str(copy)
    m = Pixels(workers=0)(ctx).metrics
    assert m["ids_equal"] == pytest.approx(1 - 1 / 12) and m["id_agreement"] < 1


def test_pixels_over_two_ranks_gathers_the_whole_split(tokens):
    import threading

    results = {}

    def run(rank):
        results[rank] = Pixels(workers=0)(token_context(tokens, "ranks", rank=rank, world=2))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results[1] is None
    assert results[0].metrics["samples"] == 12 and results[0].metrics["acc1_diff"] == 0


def test_pixels_refuses_a_pixel_model(tokens):
    tmp, images, _, _ = tokens
    net = NearestMean(pixel_embed, torch.rand(CLASSES, 3))
    ctx = context(tmp, {"data": {"kind": "images", "source": str(images)}}, loaded(net, "pixels"), "px")
    with pytest.raises(ConfigError, match="pixel model, which reads images already: use eval=classify"):
        Pixels()(ctx)


# -- corruptions -------------------------------------------------------------------------------
def test_every_corruption_runs_reproducibly_at_32_px():
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    for name in CORRUPTIONS:
        a, b = corrupt_image(image, name, 3, index=7), corrupt_image(image, name, 3, index=7)
        assert a.shape == image.shape and a.dtype == np.uint8 and np.array_equal(a, b), name
        assert not np.array_equal(a, image), name
    assert corrupt_image(image, "fog", 0) is image
    with pytest.raises(CorruptionError, match="glass_blur needs images of at least 32x32 px.*corrupt_size"):
        corrupt_image(image[:16, :16], "glass_blur", 1)
    with pytest.raises(CorruptionError, match="unknown corruption 'rain'"):
        resolve(["fog", "rain"])
    assert resolve(["noise", "fog", "gaussian_noise"]) == ["gaussian_noise", "shot_noise", "impulse_noise", "fog"]


def test_the_subset_takes_each_class_in_turn():
    from seit.data.image_source import ImageRecord

    records = [ImageRecord(str(i), label, "x") for i, label in enumerate([0, 0, 0, 1, 1, 2])]
    assert class_balanced(records, 4) == [0, 1, 3, 5]
    assert class_balanced(records, None) == list(range(6))


# -- eval=robustness ---------------------------------------------------------------------------
def test_severity_0_scores_exactly_the_clean_images(tokens):
    result = Robustness(corruptions=["gaussian_noise", "pixelate"], severities=[0], workers=0)(
        token_context(tokens, "sev0"))
    m = result.metrics
    clean = Pixels(workers=0)(token_context(tokens, "sev0_pixels")).metrics["acc1"]
    assert m["clean_acc1"] == clean and m["mean_acc1"] == clean and m["relative_robustness"] == 1
    assert m["acc1_gaussian_noise"] == m["acc1_pixelate"] == m["acc1_sev0"] == clean
    assert m["images"] == 12


def test_corruptions_are_scored_per_type_and_severity_and_reproducibly(tokens):
    ev = Robustness(corruptions=["gaussian_noise", "frost"], severities=[1, 5], workers=0)
    first = ev(token_context(tokens, "grid"))
    m = first.metrics
    grid = first.details["acc1"]
    assert set(grid) == {"gaussian_noise", "frost"} and set(grid["frost"]) == {"1", "5"}
    assert m["mean_acc1"] == pytest.approx(np.mean([v for c in grid.values() for v in c.values()]))
    assert m["acc1_sev5"] == pytest.approx((grid["gaussian_noise"]["5"] + grid["frost"]["5"]) / 2)
    assert m["acc1_frost"] == pytest.approx((grid["frost"]["1"] + grid["frost"]["5"]) / 2)
    assert m["relative_robustness"] == pytest.approx(m["mean_acc1"] / m["clean_acc1"])
    assert m["acc1_sev5"] < m["clean_acc1"]  # frost at severity 5 hides the colours
    assert [r[0] for r in first.tables[0].rows] == ["gaussian_noise", "frost", "mean", "clean"]
    again = ev(token_context(tokens, "grid_again", rank=0, world=1))
    assert again.metrics == m
    hits = np.load(tokens[0] / "grid" / "robustness" / "hits_val.npz")
    assert hits["hits"].shape == (12, 5) and list(hits["severity"]) == [0, 1, 5, 1, 5]


def test_a_pixel_model_is_fed_corrupted_pixels_and_a_subset_is_class_balanced(tokens):
    tmp, images, _, _ = tokens
    protos = torch.tensor([[(c * 97) % 256, (c * 53 + 40) % 256, (c * 31 + 90) % 256] for c in range(CLASSES)]) / 255
    net = NearestMean(pixel_embed, protos.float())
    ctx = context(tmp, {"data": {"kind": "images", "source": str(images)}}, loaded(net, "pixels"), "pixel_model")
    result = Robustness(corruptions=["brightness"], severities=[5], max_images=6, workers=0)(ctx)
    assert result.metrics["images"] == 6 and result.metrics["clean_acc1"] == 1.0
    hits = np.load(tmp / "pixel_model" / "robustness" / "hits_val.npz")
    assert list(hits["index"]) == [0, 1, 4, 5, 8, 9]  # 2 of each class's 4


def test_a_small_model_needs_corrupt_size_and_then_resizes_around_the_corruption(tokens):
    tmp, images, _, _ = tokens
    net = NearestMean(pixel_embed, torch.rand(CLASSES, 3))
    cfg = {"data": {"kind": "images", "source": str(images), "image_size": 16}}
    with pytest.raises(ConfigError, match="reads 16x16 images.*corrupt_size=32"):
        Robustness(corruptions=["fog"], workers=0)(context(tmp, cfg, loaded(net, "pixels"), "small"))
    m = Robustness(corruptions=["fog"], severities=[0, 2], corrupt_size=48, workers=0)(
        context(tmp, cfg, loaded(net, "pixels"), "small2")).metrics
    assert {"clean_acc1", "resampled_acc1", "acc1_fog", "acc1_sev0", "acc1_sev2"} <= set(m)
    assert m["acc1_sev0"] == m["clean_acc1"]


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="severities=\\[1, 6\\] must be distinct integers in 0..5"):
        Robustness(severities=[1, 6])
    with pytest.raises(ConfigError, match="corrupt_size=16 must be null or >= 32"):
        Robustness(corrupt_size=16)
    with pytest.raises(ConfigError, match="unknown corruption 'rain'"):
        Robustness(corruptions="rain")


def test_two_ranks_and_a_worker_process_give_the_single_process_numbers(tokens):
    """Each corrupted image is seeded by its own index, so neither ranks nor workers change a number."""
    ev = dict(corruptions=["gaussian_noise", "frost"], severities=[2])
    alone = Robustness(**ev, workers=0)(token_context(tokens, "alone")).metrics
    assert Robustness(**ev, workers=1)(token_context(tokens, "split", rank=1, world=2)) is None  # writes its part
    assert Robustness(**ev, workers=0)(token_context(tokens, "split", rank=0, world=2)).metrics == alone
