"""Classification on a split holding unlabelled samples (label -1) is refused in one line (#29, #58, #59).

With dataset.json's ``unlabelled`` counts (tokenize records them) it is refused at setup; a
dataset without them (built before) fails at its first batch with the same kind of line, not
``Target -1 is out of bounds``. Pre-training takes unlabelled samples as they are.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_token_dataset
from run_helpers import paths, run
from seit.data.dataset_info import TokenDatasetInfo, write_dataset_info
from seit.data.shard_reader import read_shard
from seit.data.shard_writer import write_shard

pytestmark = pytest.mark.integration


def unlabel(root, shard: str, rows: list[int], record: bool) -> None:
    """Set the labels of ``rows`` of one shard to -1, dataset.json's sha256 and bytes to match, and with
    ``record`` its ``unlabelled`` counts as tokenize writes them."""
    info = TokenDatasetInfo.open(root)
    spec = next(s for split in info.meta["splits"] for s in info.shard_specs(split) if s.path.endswith(shard))
    chunks = list(read_shard(spec, info.load_codec()))
    labels = np.concatenate([c.labels for c in chunks]).astype(np.int64)
    labels[rows] = -1
    split = shard.split("-")[0]
    new = write_shard(spec.path, np.concatenate([c.ids for c in chunks]), labels, [k for c in chunks for k in c.keys],
                      split=split, codec=info.codec, codebook_size=info.codebook_size,
                      chunk_size=info.meta["chunk_size"]).to_dict()
    meta = info.meta
    extra = {"unlabelled": {s: len(rows) if s == split else 0 for s in meta["splits"]}} if record else {}
    write_dataset_info(root, shards=[new if s["name"] == shard else s for s in meta["shards"]], grid=meta["grid"],
                       codebook_size=meta["codebook_size"], codebook_dim=meta["codebook_dim"], codec=meta["codec"],
                       chunk_size=meta["chunk_size"], codebook_sha256=meta["codebook_sha256"],
                       classes=meta["classes"], source_bytes=0, **extra)


@pytest.fixture
def dataset(tmp_path):
    write_token_dataset(tmp_path / "ds", counts={"train": [16, 16], "val": [8]}, codebook_size=64)
    return tmp_path / "ds"


def train(tmp_path, root, *extra):
    return run(*paths(tmp_path), "data=tokens", f"data.root={root}", "debug=fast", "aug.crop=6", *extra, check=False)


def last_line(proc) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_a_recorded_unlabelled_split_is_refused_at_setup(tmp_path, dataset):
    unlabel(dataset, "val-000000.tar", [1, 4], record=True)
    line = last_line(train(tmp_path, dataset))
    assert line.startswith(f"error: {dataset}: split 'val' holds 2 unlabelled samples (label -1) of 8;"), line
    assert "out of bounds" not in line


@pytest.mark.parametrize("shard, stage", [("train-000001.tar", "training"), ("val-000000.tar", "validation")])
def test_without_the_record_the_first_batch_fails_in_one_line(tmp_path, dataset, shard, stage):
    unlabel(dataset, shard, list(range(8)), record=False)
    line = last_line(train(tmp_path, dataset, *(["+trainer.num_sanity_val_steps=0"] if stage == "training" else [])))
    assert f"samples of a {stage} batch have label -1: the {stage} split holds unlabelled samples" in line, line
    assert line.startswith("error: ") and "out of bounds" not in line


def test_continual_refuses_unlabelled_samples_even_without_the_record(tmp_path, dataset):
    unlabel(dataset, "train-000000.tar", [0, 3, 5], record=False)
    line = last_line(train(tmp_path, dataset, "experiment=continual_tokens", "task.num_tasks=2", "model.depth=1"))
    assert line.startswith(f"error: {dataset}: split 'train' holds 3 unlabelled samples (label -1) of 32;"), line


def test_pretraining_takes_unlabelled_samples(tmp_path, dataset):
    unlabel(dataset, "train-000000.tar", [0, 3, 5], record=True)
    proc = train(tmp_path, dataset, "task=pretrain_mtm")
    assert proc.returncode == 0, proc.stderr[-3000:]
