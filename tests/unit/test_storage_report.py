import gzip
import io
import math

import numpy as np

from conftest import write_token_dataset
from seit.data.dataset_info import TokenDatasetInfo
from seit.data.seit_format import escape_decode, escape_encode
from seit.data.storage_report import _seit_files, format_report, storage_report


def test_escape_code_round_trips_and_costs_two_bytes_past_254():
    ids = np.array([0, 254, 255, 390, 509, 510, 8191])
    data = escape_encode(ids)
    assert len(data) == 1 + 1 + 2 + 2 + 2 + 3 + 33
    np.testing.assert_array_equal(escape_decode(data, len(ids)), ids)


def test_seit_files_hold_the_same_ids():
    ids = np.random.default_rng(0).integers(0, 391, (5, 4, 4))
    files = _seit_files(ids, np.arange(5))
    data = gzip.decompress(files["data"])
    offsets = np.load(io.BytesIO(gzip.decompress(files["index"])))
    assert offsets[0] == 0 and offsets[-1] == len(data)
    for i in range(5):
        np.testing.assert_array_equal(escape_decode(data[offsets[i]:offsets[i + 1]], 16), ids[i].reshape(-1))


def test_report_rows_on_identical_ids(tmp_path):
    meta = write_token_dataset(tmp_path, counts={"train": [40, 30], "val": [10]}, grid=(8, 8), codebook_size=300)
    info = TokenDatasetInfo.open(tmp_path)
    report = storage_report(info, source_bytes_per_sample=2000.0, max_samples=50)
    assert report["samples"] == 70  # whole shards: 40 + 30
    rows = report["rows"]
    shard_bytes = sum(s["bytes"] for s in meta["shards"][:2])
    assert rows["ours"]["bytes_per_sample"] == round(shard_bytes / 70, 2)
    assert rows["raw"]["bits_per_token"] == round(math.log2(300), 3)
    assert rows["ours"]["decode_samples_per_s_per_core"] > 0
    assert "SeiT's format / ours" in format_report(report)
