"""SeiT's token files: the writer's byte layout, import/export round trips, and errors naming the file."""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import write_token_dataset
from seit.data.chunk import decode_chunk
from seit.data.dataset_info import DatasetError, TokenDatasetInfo
from seit.data.seit_format import (SeitFormatError, escape_decode, find_synonyms, read_seit_codebook,
                                   read_seit_split, read_synonyms, seit_split_paths, write_seit_codebook,
                                   write_seit_split, write_synonyms)
from seit.pipelines.convert import convert
from seit.tokenizers.codebook_tools import synonyms as nearest_codes

K, GRID, PREFIX = 391, (32, 32), "imagenet1k"
COUNTS = {"train": 37, "val": 11}


def make_seit(root: Path, seed: int = 0) -> dict:
    """A SeiT token set with ids over all of K (254, 255 and 390 planted in image 0), written by our writer.

    The codebook holds float16-representable values: our datasets store codebooks in float16, so
    only such values survive import bit-exactly. Each code's synonyms list starts with the code
    itself and names 6 others.
    """
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in COUNTS.items():
        ids = rng.integers(0, K, (n, *GRID)).astype(np.uint16)
        ids[0, 0, :3] = [254, 255, 390]
        labels = rng.integers(0, 7, n).astype(np.int64)
        write_seit_split(root, PREFIX, split, ids, labels)
        splits[split] = (ids, labels)
    codebook = torch.randn(K, 32, generator=torch.Generator().manual_seed(seed)).half().float()
    write_seit_codebook(root, codebook)
    synonyms = {str(t): [t, *((t + rng.choice(np.arange(1, K), 6, replace=False)) % K).tolist()] for t in range(K)}
    write_synonyms(root, synonyms)
    return {"splits": splits, "codebook": codebook, "synonyms": synonyms}


def config(seit_dir: Path, root: Path, direction: str, synonyms_k: int = 5, **task) -> object:
    return OmegaConf.create({
        "data": {"root": str(root), "build": {"shard_size": 16, "chunk_size": 5, "codec": "zstd-planes",
                                              "synonyms_k": synonyms_k}},
        "task": {"name": "convert", "direction": direction, "seit_dir": str(seit_dir), "prefix": PREFIX,
                 "splits": list(COUNTS), "grid": list(GRID), **task}})


def seit_contents(root: Path) -> dict:
    """Every SeiT file, decompressed: data bytes, offsets, label text, codebook, synonyms json bytes."""
    out = {"codebook": torch.load(root / "codebook.ckpt", weights_only=True),
           "synonyms": find_synonyms(root).read_bytes()}
    for split in COUNTS:
        data, index, labels = seit_split_paths(root, PREFIX, split)
        out[split] = (gzip.decompress(data.read_bytes()), np.load(io.BytesIO(gzip.decompress(index.read_bytes()))),
                      labels.read_text())
    return out


def test_writer_byte_layout(tmp_path):
    made = make_seit(tmp_path)
    ids, labels = made["splits"]["train"]
    data_path, index_path, label_path = seit_split_paths(tmp_path, PREFIX, "train")
    data = gzip.decompress(data_path.read_bytes())
    offsets = np.load(io.BytesIO(gzip.decompress(index_path.read_bytes())))
    assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == len(data) and len(offsets) == 38
    # id b < 255 is one byte, b >= 255 is 255 then b - 255: per image 1024 bytes + one per id >= 255
    assert (np.diff(offsets) == GRID[0] * GRID[1] + (ids >= 255).reshape(37, -1).sum(1)).all()
    assert data[:5] == bytes([254, 255, 0, 255, 135])  # the planted ids 254, 255, 390
    assert (escape_decode(data[offsets[3] : offsets[4]], 1024) == ids[3].reshape(-1)).all()
    assert label_path.read_text().splitlines() == [str(x) for x in labels]
    codebook = torch.load(tmp_path / "codebook.ckpt", weights_only=True)
    assert codebook.dtype == torch.float32 and torch.equal(codebook, made["codebook"])
    assert json.loads((tmp_path / "codebook-synonyms.json").read_text()) == made["synonyms"]


def test_reader_reads_what_the_writer_wrote(tmp_path):
    made = make_seit(tmp_path)
    for split, (ids, labels) in made["splits"].items():
        got_ids, got_labels = read_seit_split(tmp_path, PREFIX, split, GRID, codebook_size=K)
        assert got_ids.dtype == np.uint16 and np.array_equal(got_ids, ids) and np.array_equal(got_labels, labels)
    assert torch.equal(read_seit_codebook(tmp_path), made["codebook"])
    assert read_synonyms(tmp_path, codebook_size=K) == made["synonyms"]


def test_import_then_export_is_exact(tmp_path):
    src, root, back = tmp_path / "seit", tmp_path / "ds", tmp_path / "back"
    made = make_seit(src)
    meta = convert(config(src, root, "import"))
    assert meta["splits"] == COUNTS and meta["codebook_size"] == K and meta["grid"] == list(GRID)
    assert meta["classes"] == [str(i) for i in range(7)]
    assert meta["source_bytes"] == sum(p.stat().st_size for p in src.iterdir())

    info = TokenDatasetInfo.open(root)
    assert torch.equal(info.load_codebook(), made["codebook"])
    assert meta["synonyms_file"] == "synonyms.safetensors" and meta["synonyms_from"] == "seit"
    assert info.load_synonyms().tolist() == [made["synonyms"][str(t)][1:6] for t in range(K)]
    for split, (ids, labels) in made["splits"].items():
        chunks = []
        for path in info.shard_paths(split):
            with tarfile.open(path) as tar:
                chunks += [decode_chunk(tar.extractfile(m).read(), info.codec) for m in tar]
        assert [k for c in chunks for k in c.keys] == [f"{split}/{i:08d}" for i in range(len(ids))]
        assert np.array_equal(np.concatenate([c.ids for c in chunks]), ids)
        assert np.array_equal(np.concatenate([c.labels for c in chunks]), labels)

    convert(config(back, root, "export"))
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in src.iterdir())
    original, exported = seit_contents(src), seit_contents(back)
    for split in COUNTS:
        data, offsets, labels = exported[split]
        assert data == original[split][0] and np.array_equal(offsets, original[split][1])
        assert labels == original[split][2]
    assert torch.equal(exported["codebook"], original["codebook"]) and exported["synonyms"] == original["synonyms"]


def test_export_keeps_the_synonyms_file_name(tmp_path):
    src = tmp_path / "seit"
    make_seit(src)
    (src / "codebook-synonyms.json").rename(src / "synonyms.json")
    convert(config(src, tmp_path / "ds", "import", splits=["val"]))
    convert(config(tmp_path / "back", tmp_path / "ds", "export"))
    assert (tmp_path / "back" / "synonyms.json").read_bytes() == (src / "synonyms.json").read_bytes()
    assert not (tmp_path / "back" / f"{PREFIX}-train-label.txt").exists()  # only the imported split


def test_synonyms_come_from_the_codebook_when_seit_names_too_few(tmp_path):
    src = tmp_path / "seit"
    made = make_seit(src)
    write_synonyms(src, {"0": [0, 17, 390], "255": [255, 3]})
    meta = convert(config(src, tmp_path / "a", "import"))
    assert meta["synonyms_from"] == "codebook"
    assert torch.equal(TokenDatasetInfo.open(tmp_path / "a").load_synonyms(), nearest_codes(made["codebook"], 5))

    (src / "codebook-synonyms.json").unlink()  # no SeiT synonyms: export writes the dataset's table
    convert(config(src, tmp_path / "b", "import", synonyms_k=3))
    convert(config(tmp_path / "back", tmp_path / "b", "export"))
    table = nearest_codes(made["codebook"], 3).tolist()
    assert read_synonyms(tmp_path / "back") == {str(t): row for t, row in enumerate(table)}

    convert(config(src, tmp_path / "c", "import", synonyms_k=0))
    assert "synonyms_file" not in json.loads((tmp_path / "c" / "dataset.json").read_text())


def test_export_orders_samples_by_key(tmp_path):
    """A tokenize-built dataset (shuffled keys, several shards) comes out sorted by key."""
    write_token_dataset(tmp_path / "ds", counts={"train": [20, 7], "val": [5]}, grid=(8, 8), codebook_size=300)
    info = TokenDatasetInfo.open(tmp_path / "ds")
    convert(config(tmp_path / "back", tmp_path / "ds", "export"))
    for split in ("train", "val"):
        samples = []
        for path in info.shard_paths(split):
            with tarfile.open(path) as tar:
                for chunk in (decode_chunk(tar.extractfile(m).read(), info.codec) for m in tar):
                    samples += zip(chunk.keys, chunk.ids, chunk.labels)
        samples.sort(key=lambda s: s[0])
        ids, labels = read_seit_split(tmp_path / "back", PREFIX, split, (8, 8), codebook_size=300)
        assert np.array_equal(ids, np.stack([s[1] for s in samples]))
        assert np.array_equal(labels, [s[2] for s in samples])


def test_ids_beyond_what_seit_reads_are_refused(tmp_path):
    """SeiT's loader takes one escape byte per id, so ids >= 510 would come back wrong there."""
    with pytest.raises(ValueError, match=r"token.data.bin.gz: id 510 is beyond 509"):
        write_seit_split(tmp_path, PREFIX, "train", np.full((1, 2, 2), 510), np.zeros(1))
    write_token_dataset(tmp_path / "ds", counts={"train": [3]}, codebook_size=1024)
    with pytest.raises(DatasetError, match="K=1024"):
        convert(config(tmp_path / "back", tmp_path / "ds", "export"))
    assert not (tmp_path / "back").exists()


def test_import_refuses_a_non_empty_root(tmp_path):
    make_seit(tmp_path / "seit")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "other").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert(config(tmp_path / "seit", tmp_path / "ds", "import"))


# --- errors name the file -------------------------------------------------------------------
def rewrite_gz(path: Path, change) -> None:
    path.write_bytes(gzip.compress(change(gzip.decompress(path.read_bytes()))))


def rewrite_index(path: Path, change) -> None:
    def edit(raw: bytes) -> bytes:
        buf = io.BytesIO()
        np.save(buf, change(np.load(io.BytesIO(raw))))
        return buf.getvalue()

    rewrite_gz(path, edit)


def naming(path: Path, rest: str) -> str:
    """A message pattern that starts with the file's full path."""
    return re.escape(str(path)) + rest


@pytest.fixture
def seit_dir(tmp_path) -> Path:
    make_seit(tmp_path)
    return tmp_path


def read_train(root: Path, grid=GRID, codebook_size=K):
    return read_seit_split(root, PREFIX, "train", grid, codebook_size=codebook_size)


def test_missing_file_is_named(seit_dir):
    seit_split_paths(seit_dir, PREFIX, "train")[1].unlink()
    with pytest.raises(SeitFormatError, match="imagenet1k-train-token.index.npy.gz not found"):
        read_train(seit_dir)


def test_offsets_beyond_the_data_are_named(seit_dir):
    data, index, _ = seit_split_paths(seit_dir, PREFIX, "train")
    rewrite_index(index, lambda o: np.concatenate([o[:-1], [o[-1] + 10]]))
    with pytest.raises(SeitFormatError, match=naming(data, r".*inside image 36.*index.npy.gz")):
        read_train(seit_dir)


def test_offsets_short_of_the_data_are_named(seit_dir):
    data, index, label = seit_split_paths(seit_dir, PREFIX, "train")
    rewrite_index(index, lambda o: o[:-1])  # the last image drops out of the index
    label.write_text("".join(label.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(SeitFormatError, match=naming(data, r" holds more than the \d+ bytes that .*index.npy.gz")):
        read_train(seit_dir)


def test_garbled_and_truncated_index_is_named(seit_dir):
    index = seit_split_paths(seit_dir, PREFIX, "train")[1]
    rewrite_index(index, lambda o: o[::-1].copy())
    with pytest.raises(SeitFormatError, match=naming(index, r": offsets must start at 0 and never decrease")):
        read_train(seit_dir)
    index.write_bytes(index.read_bytes()[:30])
    with pytest.raises(SeitFormatError, match=naming(index, r" is not a gzipped .npy")):
        read_train(seit_dir)


def test_label_count_mismatch_is_named(seit_dir):
    label = seit_split_paths(seit_dir, PREFIX, "train")[2]
    label.write_text(label.read_text() + "3\n")
    with pytest.raises(SeitFormatError, match=naming(label, r" has 38 labels, but .*indexes 37 images")):
        read_train(seit_dir)


def test_wrong_token_count_names_file_and_image(seit_dir):
    data, index, _ = seit_split_paths(seit_dir, PREFIX, "train")
    offsets = np.load(io.BytesIO(gzip.decompress(index.read_bytes())))
    end = offsets[5]  # drop the last byte of image 4 (always a value byte, never an escape)
    rewrite_gz(data, lambda b: b[: end - 1] + b[end:])
    rewrite_index(index, lambda o: np.where(np.arange(len(o)) >= 5, o - 1, o))
    with pytest.raises(SeitFormatError, match=naming(data, r": image 4 .*decoded 1023 tokens, expected 1024")):
        read_train(seit_dir)


def test_wrong_grid_and_ids_beyond_the_codebook_are_named(seit_dir):
    data = seit_split_paths(seit_dir, PREFIX, "train")[0]
    with pytest.raises(SeitFormatError, match=naming(data, r": image 0 .*expected 992 for a 32x31 grid")):
        read_train(seit_dir, grid=(32, 31))
    with pytest.raises(SeitFormatError, match=naming(data, r": image 0 holds id 390, outside the codebook's 300")):
        read_train(seit_dir, codebook_size=300)


def test_bad_codebook_and_synonyms_are_named(seit_dir):
    torch.save({"codebook": torch.zeros(3, 2)}, seit_dir / "codebook.ckpt")
    with pytest.raises(SeitFormatError, match="codebook.ckpt must hold a K x D float tensor, holds dict"):
        read_seit_codebook(seit_dir)
    write_synonyms(seit_dir, {"0": [1, 400]})
    with pytest.raises(SeitFormatError, match=r"synonyms.json: entry '0'"):
        read_synonyms(seit_dir, codebook_size=K)


def test_a_malformed_split_leaves_no_dataset(tmp_path):
    make_seit(tmp_path / "seit")
    label = seit_split_paths(tmp_path / "seit", PREFIX, "val")[2]
    label.write_text(label.read_text() + "oops\n")
    with pytest.raises(SeitFormatError, match=naming(label, r" line 12: 'oops' is not an integer")):
        convert(config(tmp_path / "seit", tmp_path / "ds", "import"))
    assert not (tmp_path / "ds").exists()
