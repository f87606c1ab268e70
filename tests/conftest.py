"""Shared fixtures: small synthetic images and token datasets that the tests make themselves."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]


def make_image_folder(root: Path, *, classes: int = 3, train: int = 12, val: int = 4, size: int = 16,
                      fmt: str = "PNG") -> Path:
    """ImageFolder with train/ and val/: each class a distinct colour plus noise, so it is learnable."""
    rng = np.random.default_rng(0)
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = np.array([(c * 97) % 256, (c * 53 + 40) % 256, (c * 31 + 90) % 256])
            for i in range(n):
                img = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{split}_{c}_{i:03d}.{ext}", format=fmt)
    return root


def write_token_dataset(root: Path, *, counts: dict[str, list[int]], grid=(8, 8), codebook_size: int = 300,
                        chunk_size: int = 16, num_classes: int = 5, seed: int = 0) -> dict:
    """A token dataset with random ids; a sample's label is derived from its key, so tests can check pairing."""
    from seit.data.dataset_info import CODEBOOK_FILE, SHARD_DIR, save_codebook, write_dataset_info
    from seit.data.shard_writer import write_shard

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    fingerprint = save_codebook(root / CODEBOOK_FILE, torch.randn(codebook_size, 4))
    records = []
    for split, shard_counts in counts.items():
        for s, n in enumerate(shard_counts):
            keys = [f"{split}/{s}/{i}" for i in range(n)]
            labels = np.array([label_of(k, num_classes) for k in keys], dtype=np.int64)
            ids = rng.integers(0, codebook_size, (n, *grid)).astype(np.uint16)
            records.append(write_shard(root / SHARD_DIR / f"{split}-{s:06d}.tar", ids, labels, keys, split=split,
                                       codec="zstd-planes", codebook_size=codebook_size,
                                       chunk_size=chunk_size).to_dict())
    return write_dataset_info(root, shards=records, grid=grid, codebook_size=codebook_size, codebook_dim=4,
                              codec="zstd-planes", chunk_size=chunk_size, codebook_sha256=fingerprint,
                              classes=[f"c{i}" for i in range(num_classes)], source_bytes=0)


def tokenize_config(images: Path, root: Path, **build):
    """A task=tokenize config for tiny 16 px images: k-means patch tokenizer (K=16), shards of 10, chunks of 4."""
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "paths": {"cache_dir": str(root.parent / "cache")},
        "tokenizer": {"kind": "patch_kmeans", "checkpoint": None, "image_size": 16, "patch_size": 4,
                      "codebook_size": 16, "codebook_dim": 8, "fit_images": 20, "fit_patches": 2000, "fit_iters": 5,
                      "seed": 0, "compact": False},
        "data": {"root": str(root), "build": {
            "source": str(images), "shard_size": 10, "chunk_size": 4, "codec": "ctx-rans", "codec_fit_samples": 12,
            "shuffle_seed": 0, "workers": 0, "skip_bad_images": False, "synonyms_k": 3, "storage_report": True,
            "storage_report_samples": 20, **build}}})


def label_of(key: str, num_classes: int) -> int:
    return sum(map(ord, key)) % num_classes


def spawn_ranks(fn, *args, world: int = 2, timeout: float = 300) -> None:
    """``fn(rank, world, *args)`` in ``world`` processes at once, as ``torch.multiprocessing.spawn`` would
    (``fn`` at a test module's top level, ``args`` picklable), but forked by the fork server: a fresh
    interpreter per rank costs about 10 s here, and forking pytest itself can hang in OpenMP."""
    import pickle
    import subprocess
    import tempfile

    from fork_server import FORK_SERVER, env

    with tempfile.TemporaryDirectory() as tmp:
        call = Path(tmp) / "call.pkl"
        call.write_bytes(pickle.dumps((fn.__module__, fn.__name__, args)))
        # as many torch threads as this process has, as spawned ranks would: sums can differ in the
        # last bit between thread counts
        code = (f"import importlib, pickle, sys, torch; torch.set_num_threads({torch.get_num_threads()}); "
                "sys.path[:0] = sys.argv[3:]; "
                f"module, name, args = pickle.loads(open({str(call)!r}, 'rb').read()); "
                "getattr(importlib.import_module(module), name)(int(sys.argv[1]), int(sys.argv[2]), *args)")
        where = [str(Path(sys.modules[fn.__module__].__file__).parent), str(REPO / "tests")]
        procs = [subprocess.Popen([FORK_SERVER.python(), "-c", code, str(rank), str(world), *where], cwd=REPO,
                                  env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(world)]
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} of {fn.__name__} failed ({p.returncode}):\n{out[-4000:]}"


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> tuple:
    """``python run.py debug=fast`` (the default experiment: embedded MNIST, tokenized on the way, then
    3 training steps), run once per session: (its tmp dir, the finished process). Its dir holds the
    5,000-digit token dataset (``tokens/``) and the extracted images (``cache/``); ``on_quickstart_data``
    points another run at them, so no other test tokenizes the digits again."""
    from run_helpers import paths, run  # tests/integration, on sys.path for the integration tests using this

    tmp = tmp_path_factory.mktemp("quickstart")
    return tmp, run(*paths(tmp), f"paths.cache_dir={tmp}/cache", "debug=fast")


def on_quickstart_data(quickstart_dir: Path, tmp: Path) -> list[str]:
    """Overrides that read the quickstart's token dataset and images, and write everything else under ``tmp``."""
    return [f"paths.data_dir={quickstart_dir}/tokens", f"paths.cache_dir={quickstart_dir}/cache",
            f"paths.log_dir={tmp}/logs", f"hydra.run.dir={tmp}/run", "print_config=false"]


def as_before_codebook_dim_rename(path: Path) -> dict:
    """Rewrite a saved tokenizer as files were written before ``embed_dim`` became ``codebook_dim``;
    returns the new-style config it held."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    old = {("embed_dim" if k == "codebook_dim" else k): v for k, v in config.items()}
    save_file(load_file(str(path)), str(path), metadata={**meta, "config": json.dumps(old, sort_keys=True)})
    return config


class StopAfterEpoch(pl.Callback):
    """Stops a Lightning fit at the end of epoch ``epoch`` (resume tests stop part-way, then resume)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True
