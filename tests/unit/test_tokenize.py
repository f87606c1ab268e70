"""Tokenize never destroys or half-writes: plans, refusals, resumes, rebuilds, permissions, determinism."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image_folder, tokenize_config
from seit.data.codec_ctx import MODEL_FILE
from seit.data.dataset_info import DatasetError, TokenDatasetInfo, dir_bytes
from seit.data.image_source import ImageReadError
from seit.pipelines import tokenize as tok


def shas(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def interrupted(cfg, monkeypatch) -> None:
    """A run killed after its shards, before dataset.json."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tok, "write_dataset_info", killed)
        with pytest.raises(KeyboardInterrupt):
            tok.tokenize(cfg)


def test_a_directory_tokenize_did_not_plan_is_never_written_into(tmp_path, image_folder):
    root = tmp_path / "ds"
    tok.tokenize(tokenize_config(image_folder, root))
    (root / "dataset.json").unlink()  # a finished dataset that lost its dataset.json
    before = shas(root)
    with pytest.raises(DatasetError, match=f"{root} holds .* neither dataset.json nor a tokenize plan"):
        tok.tokenize(tokenize_config(image_folder, root, shard_size=7))
    assert shas(root) == before
    other = tmp_path / "model_only"
    other.mkdir()
    (other / MODEL_FILE).write_bytes(b"someone's file")
    with pytest.raises(DatasetError, match="codec_model.safetensors"):
        tok.tokenize(tokenize_config(image_folder, other))
    assert [p.name for p in other.iterdir()] == [MODEL_FILE]


def test_a_finished_dataset_refuses_other_settings_by_name(tmp_path, image_folder, caplog):
    root = tmp_path / "ds"
    meta = tok.tokenize(tokenize_config(image_folder, root))
    assert meta["build"]["shard_size"] == 10 and meta["build"]["tokenizer"]["seed"] == 0
    with pytest.raises(DatasetError, match=r"data.build.shard_size=7 \(built with 10\); data.build.chunk_size=2"):
        tok.tokenize(tokenize_config(image_folder, root, shard_size=7, chunk_size=2))
    cfg = tokenize_config(image_folder, root, codec="zstd-planes", source=str(tmp_path))
    with pytest.raises(DatasetError, match=f"data.build.source={tmp_path} .*data.build.codec=zstd-planes"):
        tok.tokenize(cfg)
    cfg = tokenize_config(image_folder, root)
    cfg.tokenizer.seed = 1
    with pytest.raises(DatasetError, match=r"tokenizer.seed=1 \(built with 0\)"):
        tok.tokenize(cfg)
    with caplog.at_level(logging.INFO):
        assert tok.tokenize(tokenize_config(image_folder, root))["num_samples"] == meta["num_samples"]
        cfg = tokenize_config(image_folder, root)  # its own tokenizer, named: the same codebook, so the same dataset
        cfg.tokenizer.checkpoint = str(tmp_path / "ds.tokenizer.safetensors")
        assert tok.tokenize(cfg)["num_samples"] == meta["num_samples"]
    assert caplog.text.count("nothing to do") == 2


def test_an_interrupted_run_resumes_only_under_its_own_plan(tmp_path, image_folder, monkeypatch):
    root = tmp_path / "ds"
    interrupted(tokenize_config(image_folder, root), monkeypatch)
    with pytest.raises(DatasetError, match=r"interrupted tokenize run with other settings: data.build.shuffle_seed=1"):
        tok.tokenize(tokenize_config(image_folder, root, shuffle_seed=1))


def test_a_resume_rebuilds_the_finished_shards_that_went_bad(tmp_path, image_folder, monkeypatch, caplog):
    clean = tok.tokenize(tokenize_config(image_folder, tmp_path / "clean"))
    root = tmp_path / "ds"
    interrupted(tokenize_config(image_folder, root), monkeypatch)
    shard = root / "shards" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        meta = tok.tokenize(tokenize_config(image_folder, root))
    assert "shard train-000001.tar does not match its progress record" in caplog.text
    assert [s["sha256"] for s in meta["shards"]] == [s["sha256"] for s in clean["shards"]]
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == meta["shards"][1]["sha256"]


def test_rebuild_shards_restores_a_corrupt_shard_byte_for_byte(tmp_path, image_folder):
    root = tmp_path / "ds"
    meta = tok.tokenize(tokenize_config(image_folder, root))
    name = meta["shards"][2]["name"]
    shard = root / "shards" / name
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    assert tok.rebuild_shards(root, [name]) == [meta["shards"][2]]
    assert shard.read_bytes() == good

    shard.write_bytes(b"damaged")
    img = next((image_folder / "train").rglob("*.png"))
    original = img.read_bytes()
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(img)  # same listing, other pixels
    with pytest.raises(DatasetError, match=r"rebuilding shard .* gave sha256 .*: the source images, the tokenizer or "
                                           r"dataset.json changed since the build; the old file is kept"):
        tok.rebuild_shards(root, [s["name"] for s in meta["shards"]])
    assert shard.read_bytes() == b"damaged"
    img.write_bytes(original)
    (img.parent / "new.png").write_bytes(original)
    with pytest.raises(DatasetError, match=f"cannot rebuild shard {name} .* no longer gives it the images"):
        tok.rebuild_shards(root, [name])
    os.rename(image_folder, tmp_path / "moved")
    with pytest.raises(DatasetError, match=f"its source {image_folder} is gone"):
        tok.rebuild_shards(root, [name])
    with pytest.raises(DatasetError, match="lists no shard"):
        tok.rebuild_shards(root, ["train-999999.tar"])


def test_dataset_json_is_written_once_with_its_storage_report(tmp_path, image_folder, monkeypatch):
    import seit.data.dataset_info as dataset_info

    written, write = [], dataset_info.atomic_write_bytes
    monkeypatch.setattr(dataset_info, "atomic_write_bytes", lambda path, data: (written.append(Path(path).name),
                                                                                write(path, data)))
    root = tmp_path / "ds"
    meta = tok.tokenize(tokenize_config(image_folder, root))
    assert written == ["dataset.json"]
    on_disk = json.loads((root / "dataset.json").read_text())
    assert on_disk == meta and set(meta["storage"]["rows"]) == {"raw", "seit", "zstd", "ours"}
    assert meta["bytes_on_disk"] == dir_bytes(root)

    def crash(*args, **kwargs):
        raise RuntimeError("killed during the storage report")

    monkeypatch.setattr(tok, "storage_report", crash)
    with pytest.raises(RuntimeError):
        tok.tokenize(tokenize_config(image_folder, tmp_path / "other"))
    assert not (tmp_path / "other" / "dataset.json").exists()


@pytest.mark.parametrize("key,value,message", [
    ("chunk_size", 0, "data.build.chunk_size=0 must be an integer > 0"),
    ("shard_size", -1, "data.build.shard_size=-1 must be an integer > 0"),
    ("workers", -2, "data.build.workers=-2 must be an integer >= 0"),
    ("codec", "nope", "data.build.codec=nope must be one of"),
    ("codec_fit_samples", 0, "data.build.codec_fit_samples=0 must be"),
    ("synonyms_k", -1, "data.build.synonyms_k=-1 must be"),
    ("synonyms_k", 16, r"data.build.synonyms_k=16 must be < tokenizer.codebook_size=16"),
    ("storage_report_samples", 0, "data.build.storage_report_samples=0 must be"),
])
def test_settings_are_checked_before_anything_is_written(tmp_path, image_folder, key, value, message):
    with pytest.raises(ValueError, match=message):
        tok.tokenize(tokenize_config(image_folder, tmp_path / "ds", **{key: value}))
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.tokenizer.safetensors").exists()


@pytest.mark.parametrize("key,value,message", [
    ("image_size", 18, "tokenizer.image_size=18 must be a multiple of tokenizer.patch_size=4"),
    ("codebook_size", 1, "tokenizer.codebook_size=1 must be an integer >= 2"),
    ("kind", "vq", "a 'vq' tokenizer is not fitted by tokenize"),
])
def test_tokenizer_settings_are_checked_before_anything_is_written(tmp_path, image_folder, key, value, message):
    cfg = tokenize_config(image_folder, tmp_path / "ds", synonyms_k=0)
    cfg.tokenizer[key] = value
    with pytest.raises(ValueError, match=message):
        tok.tokenize(cfg)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.tokenizer.safetensors").exists()


def test_files_are_written_with_the_usual_permissions(tmp_path, image_folder):
    old = os.umask(0o022)
    try:
        tok.tokenize(tokenize_config(image_folder, tmp_path / "ds"))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "ds").rglob("*") if p.is_file()] + [tmp_path / "ds.tokenizer.safetensors"]
    assert {p.name for p in files} >= {"codebook.safetensors", "synonyms.safetensors", MODEL_FILE, "dataset.json"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o644) for p in files}


def test_the_same_settings_give_the_same_bytes(tmp_path, image_folder):
    a = tok.tokenize(tokenize_config(image_folder, tmp_path / "a"))
    b = tok.tokenize(tokenize_config(image_folder, tmp_path / "b"))
    files = shas(tmp_path / "a")
    assert files.pop("dataset.json") and len(files) == 9  # 6 shards, codebook, synonyms, codec model
    assert files == {k: v for k, v in shas(tmp_path / "b").items() if k != "dataset.json"}
    assert ((tmp_path / "a.tokenizer.safetensors").read_bytes() == (tmp_path / "b.tokenizer.safetensors").read_bytes())
    timing = ("storage", "tokenizer", "bytes_on_disk", "bytes_per_sample", "percent_of_source")  # decode speeds, paths
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}


def test_files_not_tokenized_are_counted_and_listed(tmp_path, caplog):
    images = make_image_folder(tmp_path / "images", classes=2, train=6, val=2)
    (images / "train" / "notes.txt").write_text("beside the class folders")
    (images / "val" / "class1" / "x.tiff").write_bytes(b"not a tokenized extension")
    with caplog.at_level(logging.WARNING):
        meta = tok.tokenize(tokenize_config(images, tmp_path / "ds"))
    assert meta["ignored_files"]["count"] == 2
    assert sorted(Path(p).name for p in meta["ignored_files"]["files"]) == ["notes.txt", "x.tiff"]
    assert "2 file(s) in" in caplog.text and "are not tokenized" in caplog.text


def test_a_broken_symlink_is_named_and_skipped_on_request(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=2, train=6, val=2)
    link = images / "train" / "class0" / "gone.png"
    link.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ImageReadError, match="gone.png"):
        tok.tokenize(tokenize_config(images, tmp_path / "strict"))
    meta = tok.tokenize(tokenize_config(images, tmp_path / "ds", skip_bad_images=True))
    assert meta["skipped"] == {"count": 1, "samples": [str(link)]} and meta["splits"]["train"] == 12


def _flat_images(root: Path, colours) -> Path:
    for i, colour in enumerate(colours):
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("compact", [False, True])
def test_a_codebook_of_flat_images_is_refused_before_anything_is_written(tmp_path, compact):
    cfg = tokenize_config(_flat_images(tmp_path / "flat", [100] * 12), tmp_path / "ds")
    cfg.tokenizer.compact = compact
    with pytest.raises(ValueError, match="1 distinct code: the images are flat"):
        tok.tokenize(cfg)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds.tokenizer.safetensors").exists()


def test_a_compacted_codebook_smaller_than_synonyms_k_clamps_it(tmp_path, caplog):
    cfg = tokenize_config(_flat_images(tmp_path / "two", [0, 255] * 6), tmp_path / "ds", synonyms_k=5)
    cfg.tokenizer.compact = True
    with caplog.at_level(logging.WARNING):
        meta = tok.tokenize(cfg)
    assert meta["codebook_size"] == 2 and meta["synonyms_k"] == 1
    assert "1 synonyms per code, not data.build.synonyms_k=5" in caplog.text


def test_a_rebuild_checks_only_the_images_of_its_own_shards(tmp_path, image_folder):
    root = tmp_path / "ds"
    meta = tok.tokenize(tokenize_config(image_folder, root))
    assert all(len(s["records_sha256"]) == 64 for s in meta["shards"])
    train, val = (next(s for s in meta["shards"] if s["split"] == split) for split in ("train", "val"))
    for s in (train, val):
        (root / "shards" / s["name"]).write_bytes(b"damaged")
    next((image_folder / "val").rglob("*.png")).unlink()  # one val image gone: the train shards still rebuild (#39)
    assert tok.rebuild_shards(root, [train["name"]]) == [train]
    with pytest.raises(DatasetError, match=f"cannot rebuild shard {val['name']} .*images of split val were added, "
                                           "removed or relabelled"):
        tok.rebuild_shards(root, [val["name"]])
    assert (root / "shards" / val["name"]).read_bytes() == b"damaged"

    info = json.loads((root / "dataset.json").read_text())
    info["shards"][0]["sha256"] = "0" * 64  # images unchanged, dataset.json edited (#25, #26)
    (root / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"gave sha256 .*, not the recorded 000000000000…: the source images, the "
                                           r"tokenizer or dataset.json changed since the build"):
        tok.rebuild_shards(root, [info["shards"][0]["name"]])
    for s in info["shards"]:  # a dataset built before records_sha256: the whole listing must be as built
        del s["records_sha256"]
    (root / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="the images in its source .* changed since it was built"):
        tok.rebuild_shards(root, [train["name"]])


def test_a_dataset_moved_with_its_tokenizer_is_rebuilt_with_the_tokenizer_beside_it(tmp_path, image_folder):
    root, away = tmp_path / "ds", tmp_path / "away"
    meta = tok.tokenize(tokenize_config(image_folder, root))
    away.mkdir()
    os.rename(root, away / "ds")  # the README's layout: DIR and DIR.tokenizer.safetensors side by side (#37)
    os.rename(tmp_path / "ds.tokenizer.safetensors", away / "ds.tokenizer.safetensors")
    name = meta["shards"][1]["name"]
    shard = away / "ds" / "shards" / name
    good = shard.read_bytes()
    shard.write_bytes(b"damaged")
    tok.rebuild_shards(away / "ds", [name])
    assert shard.read_bytes() == good

    other = tokenize_config(image_folder, tmp_path / "other")
    other.tokenizer.seed = 1
    tok.tokenize(other)
    os.replace(tmp_path / "other.tokenizer.safetensors", away / "ds.tokenizer.safetensors")  # not its codebook
    shard.write_bytes(b"damaged")
    with pytest.raises(DatasetError, match=r"the tokenizer .*away/ds.tokenizer.safetensors does not have the codebook"):
        tok.rebuild_shards(away / "ds", [name])
    assert shard.read_bytes() == b"damaged"


def test_codebook_size_is_named_before_the_settings_compared_with_it(tmp_path, image_folder):
    cfg = tokenize_config(image_folder, tmp_path / "ds")  # synonyms_k=3 is checked against it (#48)
    cfg.tokenizer.codebook_size = 0
    with pytest.raises(ValueError, match=r"^tokenizer.codebook_size=0 must be an integer >= 2"):
        tok.tokenize(cfg)


def _loose(d: Path, n: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"v{i}.png")


def test_unlabelled_splits_and_empty_classes_are_warned_and_recorded(tmp_path, caplog):
    images = make_image_folder(tmp_path / "images", classes=2, train=6, val=0)
    for d in (images / "val").iterdir():
        d.rmdir()
    _loose(images / "val", 4)  # loose images beside a labelled train: every val label -1 (#59)
    (images / "train" / "class2").mkdir()  # an empty class folder (#53)
    with caplog.at_level(logging.WARNING):
        meta = tok.tokenize(tokenize_config(images, tmp_path / "ds"))
    assert meta["classes"] == ["class0", "class1", "class2"]
    assert meta["unlabelled"] == {"train": 0, "val": 4}
    assert meta["empty_classes"] == {"train": ["class2"], "val": ["class0", "class1", "class2"]}
    assert {s["split"]: s["unlabelled"] for s in meta["shards"]} == {"train": 0, "val": 4}
    assert TokenDatasetInfo.open(tmp_path / "ds").meta["unlabelled"] == {"train": 0, "val": 4}
    lines = [r.getMessage() for r in caplog.records]
    assert any("without labels while train has them: val (4 of 4 images)" in m for m in lines)
    assert any("without images: train: class2; kept in the class list" in m for m in lines)

    images = make_image_folder(tmp_path / "images2", classes=2, train=6, val=2)
    (images / "val" / "class9").mkdir()  # a class only in val, and empty there (#54)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        meta = tok.tokenize(tokenize_config(images, tmp_path / "ds2"))
    assert meta["unlabelled"] == {"train": 0, "val": 0}
    assert meta["empty_classes"] == {"train": ["class9"], "val": ["class9"]}
    assert "without images: train: class9; val: class9; kept" in caplog.text


def _legacy(tokenizer: dict) -> dict:
    """Tokenizer settings as plans and dataset.json wrote them before codebook_dim was called that."""
    return {("embed_dim" if k == "codebook_dim" else k): v for k, v in tokenizer.items()}


def test_a_plan_from_before_the_codebook_dim_rename_resumes(tmp_path, image_folder, monkeypatch):
    clean = tok.tokenize(tokenize_config(image_folder, tmp_path / "clean"))
    root = tmp_path / "ds"
    interrupted(tokenize_config(image_folder, root), monkeypatch)
    path = root / ".progress" / "plan.json"
    plan = json.loads(path.read_text())
    assert plan["tokenizer"]["codebook_dim"] == 8
    path.write_text(json.dumps({**plan, "tokenizer": _legacy(plan["tokenizer"])}))
    cfg = tokenize_config(image_folder, root)
    cfg.tokenizer.codebook_dim = 4
    with pytest.raises(DatasetError, match=r"other settings: tokenizer.codebook_dim=4 \(built with 8\); resume"):
        tok.tokenize(cfg)  # the old key is compared under its new name
    meta = tok.tokenize(tokenize_config(image_folder, root))
    assert [s["sha256"] for s in meta["shards"]] == [s["sha256"] for s in clean["shards"]]
    assert meta["codebook_dim"] == 8 and meta["build"]["tokenizer"] == clean["build"]["tokenizer"]


def test_a_dataset_from_before_the_codebook_dim_rename_is_still_the_same_dataset(tmp_path, image_folder, caplog):
    root = tmp_path / "ds"
    meta = tok.tokenize(tokenize_config(image_folder, root))
    legacy = {("embed_dim" if k == "codebook_dim" else k): v for k, v in meta.items()}
    legacy["build"] = {**meta["build"], "tokenizer": _legacy(meta["build"]["tokenizer"])}
    (root / "dataset.json").write_text(json.dumps(legacy))
    assert TokenDatasetInfo.open(root).codebook_dim == 8
    with caplog.at_level(logging.INFO):
        assert tok.tokenize(tokenize_config(image_folder, root))["num_samples"] == meta["num_samples"]
    assert "nothing to do" in caplog.text
    cfg = tokenize_config(image_folder, root)
    cfg.tokenizer.codebook_dim = 4
    with pytest.raises(DatasetError, match=r"built with other settings: tokenizer.codebook_dim=4 \(built with 8\);"):
        tok.tokenize(cfg)
