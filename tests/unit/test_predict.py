"""seit.predict on a tiny synthetic setup, and model.pretrained from a classifier of ours."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image_folder
from seit.augment.crop import center_crop
from seit.data.dataset_info import DatasetError
from seit.data.image_source import ImageReadError
from seit.models.export import save_classifier
from seit.models.vit import TokenViT
from seit.predict import Predictor, list_images, predict, write_csv
from seit.tasks.classification import load_classifier_body
from seit.tokenizers import PatchKMeansTokenizer

MODEL = {"_target_": "seit.models.vit.TokenViT", "input": "tokens", "embed_dim": 32, "depth": 1, "num_heads": 2,
         "mlp_ratio": 2.0, "drop_path_rate": 0.0}
CLASSES = ["red", "green", "blue"]
GRID, CROP = 8, 6  # 16 px images, 2 px patches: 8x8 ids, centre crop 6


def images_of(folder: Path) -> torch.Tensor:
    from seit.data.image_source import ImageRecord, load_image

    paths = list_images(folder)
    return torch.from_numpy(np.stack([load_image(ImageRecord(p.stem, -1, str(p)), 16) for p in paths]))


def fit_tokenizer(images: torch.Tensor, seed: int) -> PatchKMeansTokenizer:
    return PatchKMeansTokenizer.fit(images.float() / 255, patch_size=2, codebook_size=16, codebook_dim=4,
                                    max_patches=4000, iters=5, seed=seed)


def token_vit(tokenizer, num_classes: int, crop: int = CROP, seed: int = 0, **changes) -> TokenViT:
    torch.manual_seed(seed)
    args = {k: v for k, v in {**MODEL, **changes}.items() if k != "_target_"}
    net = TokenViT(**args, input_size=crop, num_classes=num_classes, codebook_size=tokenizer.codebook_size,
                   codebook_dim=tokenizer.codebook_dim)
    net.embed.load_codebook(tokenizer.codebook)
    return net.eval()


def export(net, tokenizer, path: Path, classes=CLASSES, crop: int = CROP) -> Path:
    config = {"model": MODEL, "codebook_size": tokenizer.codebook_size, "codebook_dim": tokenizer.codebook_dim}
    save_classifier(net, path, config=config, input_size=GRID, crop=crop, classes=classes,
                    fingerprint=tokenizer.fingerprint)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    folder = make_image_folder(tmp / "images", classes=3, train=4, val=2, size=16)
    tokenizer = fit_tokenizer(images_of(folder / "train"), seed=0)
    tokenizer.save(tmp / "tok.safetensors")
    net = token_vit(tokenizer, len(CLASSES))
    with torch.no_grad():  # a head that separates the classes a little, so top-1 varies by image
        net.vit.head.weight.normal_(0, 1.0)
    return tmp, folder, tokenizer, net, export(net, tokenizer, tmp / "classifier.safetensors")


def test_predict_matches_the_model_on_tokenized_ids(setup, tmp_path):
    tmp, folder, tokenizer, net, path = setup
    rows = predict(path, folder / "val", tokenizer=tmp / "tok.safetensors", topk=2, batch_size=4, device="cpu")
    paths = list_images(folder / "val")
    assert [r["path"] for r in rows] == [str(p) for p in paths] and len(rows) == 6
    with torch.no_grad():
        ids = tokenizer.encode(images_of(folder / "val").float() / 255)
        probs = net(net.embed(center_crop(ids, CROP))).softmax(-1)
    top = probs.topk(2, dim=1)
    assert [r["rank1_class"] for r in rows] == [CLASSES[i] for i in top.indices[:, 0].tolist()]
    assert np.allclose([r["rank1_prob"] for r in rows], top.values[:, 0].numpy(), atol=1e-5)
    assert all(r["rank1_prob"] >= r["rank2_prob"] for r in rows)
    assert len({r["rank1_class"] for r in rows}) > 1  # the check above is not a constant answer

    out = write_csv(rows, tmp_path / "out" / "predictions.csv")
    with open(out) as f:
        table = list(csv.reader(f))
    assert table[0] == ["path", "rank1_class", "rank1_prob", "rank2_class", "rank2_prob"]
    assert len(table) == 7 and {row[1] for row in table[1:]} <= set(CLASSES) and table[1][0] == str(paths[0])


def test_topk_is_capped_and_single_files_and_lists_work(setup):
    tmp, folder, _, _, path = setup
    files = list_images(folder / "val")[:2]
    rows = predict(path, [str(f) for f in files], tokenizer=tmp / "tok.safetensors", topk=10, device="cpu")
    assert rows.columns == ["path"] + [f"rank{r}_{w}" for r in (1, 2, 3) for w in ("class", "prob")]
    assert sorted(rows[0][f"rank{r}_class"] for r in (1, 2, 3)) == sorted(CLASSES)
    assert abs(sum(rows[0][f"rank{r}_prob"] for r in (1, 2, 3)) - 1) < 1e-5


def test_a_foreign_tokenizer_is_refused_by_name(setup, tmp_path):
    tmp, folder, _, _, path = setup
    other = fit_tokenizer(images_of(folder / "train")[:3], seed=5)  # another codebook, same shapes
    other.save(tmp_path / "foreign.safetensors")
    with pytest.raises(DatasetError, match="codebook mismatch.*foreign.safetensors"):
        predict(path, folder / "val", tokenizer=tmp_path / "foreign.safetensors", device="cpu")


def test_token_model_without_tokenizer_and_missing_inputs(setup, tmp_path):
    tmp, folder, _, _, path = setup
    with pytest.raises(ValueError, match="token model: name the tokenizer"):
        predict(path, folder / "val", device="cpu")
    with pytest.raises(FileNotFoundError, match="absent"):
        predict(path, tmp_path / "absent", tokenizer=tmp / "tok.safetensors", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .*file in"):
        predict(path, tmp_path / "empty", tokenizer=tmp / "tok.safetensors", device="cpu")


def test_the_tokenizer_recorded_by_the_run_is_found(setup, tmp_path):
    """<run>/summary.json names the dataset, whose dataset.json names its tokenizer."""
    import json
    import shutil

    tmp, folder, _, _, path = setup
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(path, run / "classifier.safetensors")
    (tmp_path / "ds").mkdir()
    recorded = {"tokenizer": {"checkpoint": str(tmp / "tok.safetensors")}}
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(recorded))
    (run / "summary.json").write_text(json.dumps({"dataset": {"root": str(tmp_path / "ds")}}))
    predictor = Predictor.open(run / "classifier.safetensors", device="cpu")
    assert predictor.tokenizer_path == tmp / "tok.safetensors"


def test_unreadable_images_stop_or_are_skipped(setup, tmp_path):
    tmp, folder, _, _, path = setup
    import shutil

    shutil.copytree(folder / "val", tmp_path / "val")
    bad = tmp_path / "val" / "class1" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="broken.png"):
        predict(path, tmp_path / "val", tokenizer=tmp / "tok.safetensors", device="cpu")
    rows = predict(path, tmp_path / "val", tokenizer=tmp / "tok.safetensors", device="cpu", skip_bad_images=True)
    assert len(rows) == 6 and rows.skipped == [str(bad)]


def test_pixel_model_needs_no_tokenizer(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=2, train=1, val=2, size=20)
    torch.manual_seed(0)
    model = {**MODEL, "input": "pixels", "patch_size": 4}
    net = TokenViT(**{k: v for k, v in model.items() if k != "_target_"}, input_size=12, num_classes=2).eval()
    path = tmp_path / "classifier.safetensors"
    save_classifier(net, path, config={"model": model, "codebook_size": 0, "codebook_dim": 0}, input_size=16,
                    crop=12, classes=["a", "b"], fingerprint=None)
    rows = predict(path, folder / "val", topk=1, device="cpu")
    from seit.data.image_source import ImageRecord, load_image

    images = torch.from_numpy(np.stack([load_image(ImageRecord("", -1, r["path"]), 16) for r in rows]))
    with torch.no_grad():
        expected = net(net.embed(center_crop(images, 12))).argmax(1)
    assert [r["rank1_class"] for r in rows] == [["a", "b"][i] for i in expected.tolist()]


def test_lightning_checkpoint_classes_are_indices_unless_named(setup, tmp_path):
    """A .ckpt of task=train: class names are the label indices, or the names given."""
    from seit.tasks.classification import ClassificationTask

    tmp, folder, tokenizer, net, _ = setup
    data = {"kind": "tokens", "num_classes": 3, "input_grid": GRID, "batch_size": 4,
            "codebook_size": tokenizer.codebook_size, "codebook_dim": tokenizer.codebook_dim,
            "codebook_sha256": tokenizer.fingerprint}
    aug = {"crop": CROP}
    optim = {"_target_": "seit.tasks.optim.create_optimizer", "_partial_": True, "lr": 1e-3}
    task = ClassificationTask(model=dict(MODEL), aug=aug, data=data, optim=optim)
    task.model.load_state_dict(net.state_dict())
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": dict(task.hparams), "state_dict": task.state_dict()}, ckpt)
    rows = predict(ckpt, folder / "val", tokenizer=tmp / "tok.safetensors", device="cpu", topk=1)
    named = predict(ckpt, folder / "val", tokenizer=tmp / "tok.safetensors", device="cpu", topk=1, classes=CLASSES)
    assert {r["rank1_class"] for r in rows} <= {"0", "1", "2"}
    assert [CLASSES[int(r["rank1_class"])] for r in rows] == [r["rank1_class"] for r in named]
    with pytest.raises(ValueError, match="2 names given.*3 classes"):
        predict(ckpt, folder / "val", tokenizer=tmp / "tok.safetensors", device="cpu", classes=["x", "y"])


# -- model.pretrained: a classifier's body -------------------------------------------------------
def test_pretrained_classifier_copies_the_body_not_the_head(setup):
    _, _, tokenizer, net, path = setup
    fresh = token_vit(tokenizer, num_classes=5, seed=1)
    head = fresh.vit.head.weight.detach().clone()
    load_classifier_body(fresh, path, tokenizer.fingerprint)
    source = net.state_dict()
    for key, value in fresh.state_dict().items():
        if key.startswith("vit.head."):
            continue
        assert torch.equal(value, source[key]), key
    assert fresh.vit.head.weight.shape == (5, 32) and torch.equal(fresh.vit.head.weight, head)


def test_pretrained_classifier_resamples_positions_for_another_crop(setup):
    _, _, tokenizer, net, path = setup
    wider = token_vit(tokenizer, num_classes=2, crop=GRID)
    load_classifier_body(wider, path, tokenizer.fingerprint)
    assert wider.vit.pos_embed.shape[1] == 16 and net.vit.pos_embed.shape[1] == 9
    assert torch.equal(wider.vit.blocks[0].attn.qkv.weight, net.vit.blocks[0].attn.qkv.weight)


def test_pretrained_classifier_refuses_another_codebook_or_architecture(setup):
    _, _, tokenizer, _, path = setup
    with pytest.raises(ValueError, match=f"model.pretrained: {path} was trained on codebook"):
        load_classifier_body(token_vit(tokenizer, 2), path, "0" * 64)
    with pytest.raises(ValueError, match=r"does not fit model.*depth: checkpoint 1 vs model 2"):
        load_classifier_body(token_vit(tokenizer, 2, depth=2), path, tokenizer.fingerprint)
    with pytest.raises(ValueError, match=r"embed_dim: checkpoint 32 vs model 64"):
        load_classifier_body(token_vit(tokenizer, 2, embed_dim=64), path, tokenizer.fingerprint)


def test_task_attach_loads_a_pretrained_classifier(setup):
    """ClassificationTask.load_pretrained takes a classifier export (model.pretrained), EMA included."""
    from seit.tasks.classification import ClassificationTask

    _, _, tokenizer, net, path = setup
    data = {"kind": "tokens", "num_classes": 4, "input_grid": GRID, "batch_size": 4,
            "codebook_size": tokenizer.codebook_size, "codebook_dim": tokenizer.codebook_dim,
            "codebook_sha256": tokenizer.fingerprint}
    optim = {"_target_": "seit.tasks.optim.create_optimizer", "_partial_": True, "lr": 1e-3}
    task = ClassificationTask(model={**MODEL, "pretrained": str(path)}, aug={"crop": CROP}, data=data, optim=optim,
                              ema_decay=0.9)
    task.load_codebook(tokenizer.codebook)
    task.load_pretrained(str(path))
    for module in (task.model, task.ema.module):
        assert torch.equal(module.vit.blocks[0].mlp.fc1.weight, net.vit.blocks[0].mlp.fc1.weight)
    assert task.model.vit.head.weight.shape[0] == 4


def test_pretrained_pixel_classifier_body(tmp_path):
    """A pixel classifier's body starts another pixel classifier (model.pretrained on data.kind=images)."""
    model = {k: v for k, v in {**MODEL, "input": "pixels", "patch_size": 4}.items() if k != "_target_"}
    torch.manual_seed(0)
    source = TokenViT(**model, input_size=12, num_classes=3)
    path = tmp_path / "classifier.safetensors"
    save_classifier(source, path, config={"model": {**MODEL, **model}}, input_size=12, crop=12, classes=CLASSES,
                    fingerprint=None)
    target = TokenViT(**model, input_size=12, num_classes=7)
    load_classifier_body(target, path, None)
    assert torch.equal(target.vit.patch_embed.proj.weight, source.vit.patch_embed.proj.weight)
    with pytest.raises(ValueError, match=r"patch_size: checkpoint \(4, 4\) vs model \(2, 2\)"):
        load_classifier_body(TokenViT(**{**model, "patch_size": 2}, input_size=12, num_classes=7), path, None)


# -- eval=transfer: the training runs it derives --------------------------------------------------
def test_transfer_derives_fine_tuning_and_baseline_runs(setup, tmp_path):
    from types import SimpleNamespace

    import hydra
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import REPO
    from seit.tasks.checkpoint import load_model
    from seit.utils.config import register_resolvers
    from seit.utils.validate import ConfigError

    register_resolvers()
    tmp, folder, tokenizer, _, path = setup
    target = tmp_path / "target"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=eval", f"task.checkpoint={path}", "eval=[transfer]",
                                           f"eval.transfer.data.build.source={target}", "eval.transfer.epochs=2",
                                           "eval.transfer.lr=0.01", f"paths.output_dir={tmp_path}/eval",
                                           "+eval.transfer.data.batch_size=8"])
    trained = []

    def train(run_cfg):
        trained.append(run_cfg)
        acc = 0.9 if run_cfg.model.pretrained else 0.7
        return {"val/acc1": acc, "val/acc5": 1.0, "global_step": 4, "output_dir": run_cfg.paths.output_dir}

    info = SimpleNamespace(meta={"tokenizer": {"checkpoint": str(tmp / "tok.safetensors")}})
    ctx = SimpleNamespace(cfg=cfg, model=load_model(path), output_dir=tmp_path / "eval", rank=0, train=train,
                          tokenizer=lambda: tokenizer, info=lambda: info)
    evaluator = hydra.utils.instantiate(cfg.eval.transfer, _convert_="all")
    result = evaluator(ctx)
    assert result.metrics == pytest.approx({"acc1": 0.9, "acc5": 1.0, "scratch_acc1": 0.7, "scratch_acc5": 1.0,
                                            "gain_acc1": 0.2})
    pre, scratch = trained
    assert pre.model.pretrained == str(path) and scratch.model.pretrained is None
    assert pre.paths.output_dir == str(tmp_path / "eval" / "transfer" / "pretrained")
    assert scratch.paths.output_dir == str(tmp_path / "eval" / "transfer" / "scratch")
    task = OmegaConf.to_container(pre.task, resolve=True)
    assert task["_target_"] == "seit.tasks.classification.ClassificationTask" and task["name"] == "train"
    assert task["model"]["depth"] == 1 and task["model"]["embed_dim"] == 32  # the checkpoint's, not model=micro
    assert pre.data.kind == "tokens" and pre.data.root == str(tmp_path / "eval" / "transfer" / "tokens")
    assert pre.data.build.source == str(target) and pre.data.batch_size == 8 and pre.data.subset is None
    assert pre.tokenizer.checkpoint == str(tmp / "tok.safetensors") and pre.tokenizer.codebook_size == 16
    assert pre.tokenizer.image_size == 16 and pre.tokenizer.patch_size == 2
    assert pre.trainer.max_epochs == 2 and pre.optim.lr == 0.01 and "eval" not in pre
    assert OmegaConf.select(pre, "optimized_metric") == "val/acc1"

    no_target = hydra.utils.instantiate({**OmegaConf.to_container(cfg.eval.transfer), "data": {}}, _convert_="all")
    with pytest.raises(ConfigError, match="eval.transfer.data.root=.*eval.transfer.data.build.source="):
        no_target(ctx)


def test_folders_are_searched_through_symlinks_once(setup, tmp_path):
    """Class folders linked in (a split made of links to another dataset's folders) are found; a link
    back up the tree is not followed twice."""
    _, folder, _, _, _ = setup
    (tmp_path / "val").mkdir()
    for c in ("class0", "class2"):
        (tmp_path / "val" / c).symlink_to(folder / "val" / c, target_is_directory=True)
    (tmp_path / "val" / "loop").symlink_to(tmp_path / "val", target_is_directory=True)
    found = list_images(tmp_path / "val")
    assert [p.parent.name for p in found] == ["class0"] * 2 + ["class2"] * 2
