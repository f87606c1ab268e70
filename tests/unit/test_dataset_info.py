import json

import pytest
import torch

from conftest import write_token_dataset
from seit.data.dataset_info import (CODEBOOK_FILE, INFO_FILE, REQUIRED_FIELDS, DatasetError, TokenDatasetInfo,
                                    dir_bytes, save_codebook)


def test_dataset_json_is_self_describing(tmp_path):
    meta = write_token_dataset(tmp_path, counts={"train": [20, 7], "val": [5]})
    assert set(REQUIRED_FIELDS) <= set(meta)
    assert meta["num_samples"] == 32 and meta["splits"] == {"train": 27, "val": 5}
    assert meta["bytes_on_disk"] == dir_bytes(tmp_path)  # counts dataset.json itself
    assert [s["count"] for s in meta["shards"]] == [20, 7, 5]
    info = TokenDatasetInfo.open(tmp_path)
    assert info.num_samples("train") == 27 and info.grid == (8, 8)
    assert info.load_codebook().shape == (300, 4)


def test_missing_dataset_says_how_to_build_it(tmp_path):
    with pytest.raises(DatasetError, match="task=tokenize"):
        TokenDatasetInfo.open(tmp_path / "absent")


def test_missing_fields_and_shards_are_named(tmp_path):
    write_token_dataset(tmp_path, counts={"train": [4]})
    meta = json.loads((tmp_path / INFO_FILE).read_text())
    (tmp_path / "shards" / "train-000000.tar").unlink()
    with pytest.raises(DatasetError, match="train-000000.tar"):
        TokenDatasetInfo.open(tmp_path)
    del meta["codec"]
    (tmp_path / INFO_FILE).write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="codec"):
        TokenDatasetInfo.open(tmp_path)


def test_unknown_split_lists_splits(tmp_path):
    write_token_dataset(tmp_path, counts={"train": [4]})
    with pytest.raises(DatasetError, match="'train'"):
        TokenDatasetInfo.open(tmp_path).shards("val")


def test_codebook_fingerprint_mismatch(tmp_path):
    write_token_dataset(tmp_path, counts={"train": [4]})
    info = TokenDatasetInfo.open(tmp_path)
    with pytest.raises(DatasetError, match="codebook mismatch"):
        info.check_fingerprint("0" * 64, "the model")
    save_codebook(tmp_path / CODEBOOK_FILE, torch.randn(300, 4))  # swapped under the dataset's feet
    with pytest.raises(DatasetError, match="replaced or corrupted"):
        info.load_codebook()


def test_synonym_table_round_trip_and_checks(tmp_path):
    from seit.data.dataset_info import SYNONYMS_FILE, save_synonyms

    write_token_dataset(tmp_path, counts={"train": [4]}, codebook_size=300)
    info = TokenDatasetInfo.open(tmp_path)
    with pytest.raises(DatasetError, match="no synonym table"):
        info.load_synonyms()
    table = torch.randint(0, 300, (300, 5))
    save_synonyms(tmp_path / SYNONYMS_FILE, table)
    info.meta["synonyms_file"] = SYNONYMS_FILE
    assert torch.equal(info.load_synonyms(), table)
    save_synonyms(tmp_path / SYNONYMS_FILE, table[:10])
    with pytest.raises(DatasetError, match=r"a \(10, 5\) table, not \[300, k\]"):
        info.load_synonyms()


def test_codebook_dim_is_read_under_its_name_and_under_the_legacy_embed_dim(tmp_path):
    meta = write_token_dataset(tmp_path, counts={"train": [5]})
    assert meta["codebook_dim"] == 4 and "embed_dim" not in meta
    assert TokenDatasetInfo.open(tmp_path).codebook_dim == 4
    # a dataset.json written before the rename: embed_dim is the codebook width (not sealed, so the seal holds)
    legacy = {("embed_dim" if k == "codebook_dim" else k): v for k, v in meta.items()}
    (tmp_path / INFO_FILE).write_text(json.dumps(legacy))
    assert TokenDatasetInfo.open(tmp_path).codebook_dim == 4
    assert TokenDatasetInfo(tmp_path, {"codebook_dim": 8, "embed_dim": 4}).codebook_dim == 8  # the new name wins
