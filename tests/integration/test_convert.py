"""task=convert through run.py: a SeiT token set in, a token dataset out, and back."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from run_helpers import paths, run
from seit.data.seit_format import seit_split_paths, write_seit_codebook, write_seit_split, write_synonyms

pytestmark = pytest.mark.integration
K, PREFIX, COUNTS = 391, "imagenet1k", {"train": 37, "val": 11}


def make_seit(root) -> None:
    """A small SeiT token set: random ids over all of K, labels 0..6, codebook and synonyms."""
    rng = np.random.default_rng(0)
    for split, n in COUNTS.items():
        write_seit_split(root, PREFIX, split, rng.integers(0, K, (n, 32, 32)), rng.integers(0, 7, n))
    write_seit_codebook(root, torch.randn(K, 32).half())
    write_synonyms(root, {"0": [0, 390], "390": [390, 255]})


@pytest.mark.parametrize("codec", ["zstd-planes", "ctx-rans"])
def test_import_and_export_through_run_py(tmp_path, codec):
    src, root, back = tmp_path / "seit", tmp_path / "ds", tmp_path / "back"
    make_seit(src)
    proc = run(*paths(tmp_path), "task=convert", "task.direction=import", f"task.seit_dir={src}", f"data.root={root}",
               "data.build.shard_size=16", "data.build.chunk_size=8", f"data.build.codec={codec}")
    assert f"imported 48 samples from {src}" in proc.stdout and "(the SeiT files:" in proc.stdout
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["splits"] == COUNTS and meta["codebook_size"] == K and meta["grid"] == [32, 32]
    assert [s["name"] for s in meta["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                                   "val-000000.tar"]
    assert meta["imported_from"]["prefix"] == PREFIX and meta["synonyms_file"] == "synonyms.safetensors"
    assert meta["codec"] == codec and (root / "codec_model.safetensors").is_file() == (codec == "ctx-rans")

    run(*paths(tmp_path), "task=convert", "task.direction=export", f"task.seit_dir={back}", f"data.root={root}")
    for split in COUNTS:
        for original, exported in zip(seit_split_paths(src, PREFIX, split), seit_split_paths(back, PREFIX, split)):
            read = gzip.decompress if original.suffix == ".gz" else bytes
            assert read(exported.read_bytes()) == read(original.read_bytes())
    assert (back / "codebook-synonyms.json").read_bytes() == (src / "codebook-synonyms.json").read_bytes()
