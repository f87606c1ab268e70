"""Writing a subset manifest: which samples of a split ``task=curate`` keeps.

The format, and reading it (``read_subset``, used by the data module that trains on a manifest),
are ``seit.data.subset``'s; both are imported from here as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seit.data.dataset_info import DatasetError, TokenDatasetInfo, split_id
from seit.data.subset import FORMAT, KEPT, META, TABLE, Subset, read_subset  # noqa: F401  (read_subset: curation's API)
from seit.utils.io import atomic_open, atomic_write_json


def write_subset(out: str | Path, info: TokenDatasetInfo, split: str, keys: list[str], kept: np.ndarray,
                 cluster: np.ndarray | None = None, score: np.ndarray | None = None, **meta) -> Subset:
    out = Path(out)
    kept = np.unique(np.asarray(kept, np.int64))
    total = info.num_samples(split)
    if len(keys) != total:
        raise DatasetError(f"{len(keys)} keys for split {split!r} of {info.root}, which has {total} samples")
    if kept.size and (kept[0] < 0 or kept[-1] >= total):
        raise ValueError(f"kept indices must lie in [0, {total})")
    cluster = np.full(total, -1) if cluster is None else cluster
    score = np.full(total, np.nan) if score is None else score
    with atomic_open(out / TABLE) as f:
        f.write(b"key\tindex\tcluster\tscore\n")
        for start in range(0, len(kept), 1 << 16):
            rows = kept[start:start + (1 << 16)]
            f.write("".join(f"{keys[i]}\t{i}\t{int(cluster[i])}\t{float(score[i]):.6g}\n" for i in rows).encode())
    with atomic_open(out / KEPT) as f:
        np.save(f, kept)
    meta = {"format": FORMAT, "version": 1, "dataset": str(info.root), "split": split, "split_id": split_id(info, split),
            "num_total": total, "num_kept": int(kept.size), "kept_fraction": round(kept.size / max(total, 1), 6), **meta}
    atomic_write_json(out / META, meta)
    return Subset(out, meta, kept)

