"""pipelines.tokenize.prepare_token_dataset: what every pipeline does before it reads a token dataset."""

import pytest
from omegaconf import OmegaConf

from conftest import write_token_dataset
from seit.pipelines import tokenize as tk


def _cfg(root, source="unused"):
    return OmegaConf.create({"data": {"root": str(root), "build": {"source": source}}})


def test_other_ranks_wait_for_local_rank_0_and_never_build(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(tk, "tokenize", lambda cfg: pytest.fail("only local rank 0 builds"))
    monkeypatch.setattr(tk.time, "sleep", lambda s: write_token_dataset(root, counts={"train": [4]}))
    tk.prepare_token_dataset(_cfg(root))  # returns once rank 0's dataset.json is there
    assert (root / "dataset.json").is_file()


def test_a_rank_that_waits_too_long_says_for_what(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(tk, "BUILD_WAIT_S", -1)
    with pytest.raises(TimeoutError, match="local rank 0 to build .*dataset.json"):
        tk.prepare_token_dataset(_cfg(tmp_path / "ds"))


def test_local_rank_0_builds_a_missing_dataset_and_nothing_without_a_source(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(tk, "tokenize", lambda cfg, rank, world: built.append((cfg, rank, world)))
    tk.prepare_token_dataset(_cfg(tmp_path / "none", source=None))
    assert built == []
    tk.prepare_token_dataset(cfg := _cfg(tmp_path / "ds"))
    assert built == [(cfg, 0, 1)]  # one process, also when launched with several ranks
