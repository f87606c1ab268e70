"""The evaluators on synthetic features and a tiny synthetic token dataset (seit.eval)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from seit.data.dataset_info import DatasetError
from seit.eval.context import EvalContext
from seit.eval.fewshot import FewShot, draw_shots
from seit.eval.knn import KNN
from seit.utils.knn import knn_predict
from seit.eval.linear import LinearProbe
from seit.tasks.checkpoint import LoadedModel, load_model


def blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    centres = np.random.default_rng(1000 + classes).normal(size=(classes, dim)) * 3  # shared by train and test
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, dim)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(classes), n_per_class).astype(np.int64)


def context(tmp_path: Path, train, test, classes: int) -> EvalContext:
    cfg = OmegaConf.create({"task": {"split": "val", "train_split": "train", "batch_size": 64},
                            "data": {"kind": "tokens", "root": str(tmp_path / "none")}})
    model = LoadedModel(kind="mtm", input="tokens", net=torch.nn.Identity(), path=tmp_path / "m.ckpt", dim=train[0].shape[1])
    ctx = EvalContext(cfg=cfg, model=model, device=torch.device("cpu"), output_dir=tmp_path)
    ctx._features = {"train": train, "val": test}
    ctx._classes = [f"c{i}" for i in range(classes)]
    return ctx


def test_knn_is_perfect_on_separable_clusters(tmp_path):
    train, test = blobs(30, 4, 8, 0.1, 0), blobs(10, 4, 8, 0.1, 0)
    result = KNN(ks=[10, 20])(context(tmp_path, train, test, 4))
    assert result.metrics["acc1_k10"] == 1.0 and result.metrics["acc1_k20"] == 1.0


def test_knn_votes_are_weighted_by_similarity():
    train = np.array([[1, 0], [1, 0.1], [0, 1]], np.float32)
    labels = np.array([0, 0, 1])
    scores = knn_predict(train, labels, np.array([[0.2, 1.0]], np.float32), k=3, temperature=0.07, num_classes=2)
    assert scores.argmax(1)[0] == 1  # one close neighbour outweighs two far ones
    assert scores[0, 1] > 0 and scores[0, 0] > 0


def test_linear_probe_matches_scikit_learn_logistic_regression(tmp_path):
    from sklearn.linear_model import LogisticRegression

    train, test = blobs(200, 5, 16, 5.0, 1), blobs(100, 5, 16, 5.0, 2)
    result = LinearProbe(lrs=[0.01, 0.1], weight_decays=[0.0], epochs=30, seed=0)(context(tmp_path, train, test, 5))
    reference = LogisticRegression(max_iter=2000).fit(*train).score(*test)
    assert 0.6 < reference < 0.95  # overlapping classes: the comparison means something
    assert abs(result.metrics["acc1"] - reference) <= 0.015, (result.metrics["acc1"], reference)


def test_fewshot_draws_are_stratified_and_reproducible(tmp_path):
    labels = np.repeat(np.arange(4), 12)
    a, b, c = draw_shots(labels, 5, 0), draw_shots(labels, 5, 0), draw_shots(labels, 5, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(labels[a]).tolist() == [5, 5, 5, 5]
    with pytest.raises(DatasetError, match="fewer than 13 shots"):
        draw_shots(labels, 13, 0)
    train, test = blobs(20, 3, 8, 0.2, 3), blobs(10, 3, 8, 0.2, 4)
    result = FewShot(shots=[1, 5], draws=3)(context(tmp_path, train, test, 3))
    assert result.metrics["acc1_5shot"] == 1.0
    assert len(result.details["per_draw"]["1shot"]) == 3


def test_labelled_evaluators_refuse_unlabelled_splits(tmp_path):
    train, test = blobs(10, 2, 4, 0.1, 0), blobs(5, 2, 4, 0.1, 0)
    test = (test[0], np.full_like(test[1], -1))
    with pytest.raises(DatasetError, match="eval=knn needs labels, but split 'val'"):
        KNN()(context(tmp_path, train, test, 2))


def test_unknown_checkpoints_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"hyper_parameters": {"lr": 1}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match=f"{path}.*unknown task"):
        load_model(path)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({}, run / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=f"{run} is a directory; pass a file of it: {run}/checkpoints/last.ckpt"):
        load_model(run)
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=f"{path} is not a Lightning checkpoint of ours"):
        load_model(path)


# -- on a token dataset, over ranks ------------------------------------------------------------
def token_classifier(num_classes: int, codebook: torch.Tensor, tmp_path: Path) -> LoadedModel:
    from seit.models.vit import TokenViT
    from seit.tasks.checkpoint import vit_model

    torch.manual_seed(0)
    net = TokenViT(input="tokens", input_size=8, num_classes=num_classes, embed_dim=16, depth=1, num_heads=2,
                   codebook_size=codebook.shape[0], codebook_dim=codebook.shape[1])
    net.embed.load_codebook(codebook)
    return vit_model("classifier", net.eval(), tmp_path / "c.ckpt", crop=6, fingerprint=None, num_classes=num_classes)


def dataset_context(tmp_path: Path, model: LoadedModel, rank: int = 0, world: int = 1) -> EvalContext:
    cfg = OmegaConf.create({"task": {"split": "val", "train_split": "train", "batch_size": 4},
                            "data": {"kind": "tokens", "root": str(tmp_path / "ds")}})
    return EvalContext(cfg=cfg, model=model, device=torch.device("cpu"), output_dir=tmp_path / "run", rank=rank,
                       world=world)


def test_classify_over_two_ranks_equals_one_rank(tmp_path):
    import threading

    from conftest import write_token_dataset
    from seit.data.dataset_info import TokenDatasetInfo
    from seit.eval.classify import Classify

    write_token_dataset(tmp_path / "ds", counts={"train": [20], "val": [9, 7, 5]}, num_classes=5)
    model = token_classifier(5, TokenDatasetInfo.open(tmp_path / "ds").load_codebook(), tmp_path)
    alone = Classify()(dataset_context(tmp_path, model))
    assert alone.metrics["samples"] == 21
    results = {}

    def rank(r):
        results[r] = Classify()(dataset_context(tmp_path, model, rank=r, world=2))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results[1] is None and results[0].metrics == alone.metrics
    feats, labels = dataset_context(tmp_path, model).features("val")
    assert feats.shape == (21, 16) and len(labels) == 21


def test_classify_refuses_a_class_count_mismatch_and_a_model_without_head(tmp_path):
    from conftest import write_token_dataset
    from seit.data.dataset_info import TokenDatasetInfo
    from seit.eval.classify import Classify

    write_token_dataset(tmp_path / "ds", counts={"train": [8], "val": [8]}, num_classes=5)
    model = token_classifier(3, TokenDatasetInfo.open(tmp_path / "ds").load_codebook(), tmp_path)
    with pytest.raises(DatasetError, match="class count mismatch: .*c.ckpt classifies 3 classes, .* has 5"):
        Classify()(dataset_context(tmp_path, model))
    headless = LoadedModel(kind="mtm", input="tokens", net=torch.nn.Identity(), path=tmp_path / "m.safetensors", dim=4)
    with pytest.raises(ValueError, match=r"without a classifier head; evaluate it with eval=\[knn,linear,fewshot,segmentation\]"):
        Classify()(dataset_context(tmp_path, headless))


def test_an_mtm_export_gives_grid_features_at_any_even_grid(tmp_path):
    from seit.models.export import save_mtm
    from seit.models.mtm import MaskedTokenModel

    mtm = MaskedTokenModel(codebook_size=16, grid=8, codebook_dim=4, embed_dim=8, depth=1, num_heads=2, decoder_dim=8,
                           decoder_depth=1, decoder_heads=2)
    save_mtm(mtm, tmp_path / "mtm.safetensors", "f" * 64)
    model = load_model(tmp_path / "mtm.safetensors")
    assert model.kind == "mtm" and model.num_classes == 0 and model.fingerprint == "f" * 64
    ids = torch.randint(0, 16, (2, 8, 8))
    assert torch.allclose(model.features(ids), mtm.eval().features(ids), atol=1e-6)  # the native grid: MTM's own
    assert model.grid_features(torch.randint(0, 16, (2, 12, 20))).shape == (2, 8, 6, 10)
