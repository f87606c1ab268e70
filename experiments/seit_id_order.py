"""How much SeiT's format gains when ids are renumbered by frequency (small ids take one byte).

    python experiments/seit_id_order.py /tmp/in200_ft_m0.15

Our codec is indifferent to the numbering; SeiT's escape bytes are not, so this bounds how much
of a ratio against SeiT's format comes from the id order alone.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from seit.data.dataset_info import TokenDatasetInfo  # noqa: E402
from seit.data.seit_format import escape_encode  # noqa: E402
from seit.data.storage_report import _read_shards  # noqa: E402


def seit_bytes_per_sample(ids: np.ndarray) -> float:
    return len(gzip.compress(b"".join(escape_encode(r) for r in ids))) / len(ids)


def main() -> None:
    info = TokenDatasetInfo.open(sys.argv[1])
    _, ids, _, _ = _read_shards(info, info.load_codec(), 100_000)
    order = np.argsort(-np.bincount(ids.ravel(), minlength=info.codebook_size), kind="stable")
    rank = np.empty(info.codebook_size, np.int64)
    rank[order] = np.arange(info.codebook_size)
    print(json.dumps({"dataset": sys.argv[1], "samples": len(ids),
                      "seit_ids_as_stored": round(seit_bytes_per_sample(ids), 1),
                      "seit_ids_by_frequency": round(seit_bytes_per_sample(rank[ids]), 1)}, indent=2))


if __name__ == "__main__":
    main()
