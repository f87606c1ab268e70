"""A subset manifest: which samples of a split to keep, without rewriting a single shard.

    DIR/subset.json   dataset, split, split id, method, parameters, counts (written last)
    DIR/subset.tsv    one kept sample a line: key, index in the split, cluster id, score
    DIR/kept.npy      the kept indices (int64, ascending): what the loader reads

The loader turns the indices into per-shard row masks (dataset order is shards as listed, then
rows), so a billion-sample subset costs one bit-sized mask per shard and no key lookups. The
split id ties a manifest to the exact shards it was made from: another dataset, or a rebuilt
one, is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seit.data.dataset_info import DatasetError, TokenDatasetInfo, split_id
from seit.utils.io import atomic_open, atomic_write_json

FORMAT = "seit-subset"
META, TABLE, KEPT = "subset.json", "subset.tsv", "kept.npy"


@dataclass
class Subset:
    root: Path
    meta: dict
    kept: np.ndarray  # int64 ascending indices into the split

    @property
    def split(self) -> str:
        return self.meta["split"]

    def check_against(self, info: TokenDatasetInfo) -> None:
        if self.meta["split_id"] != split_id(info, self.split):
            raise DatasetError(f"the subset manifest {self.root} was made for {self.meta['dataset']} (split "
                               f"{self.split!r}, {self.meta['num_total']} samples), not for {info.root}: its "
                               "shards, counts or codebook differ. Re-run task=curate on this dataset")

    def shard_masks(self, info: TokenDatasetInfo) -> dict[str, np.ndarray]:
        """{shard path: bool [count]} rows kept, for the manifest's split."""
        self.check_against(info)
        masks, offset = {}, 0
        for shard, path in zip(info.shards(self.split), info.shard_paths(self.split)):
            mask = np.zeros(shard["count"], bool)
            lo, hi = np.searchsorted(self.kept, [offset, offset + shard["count"]])
            mask[self.kept[lo:hi] - offset] = True
            masks[path] = mask
            offset += shard["count"]
        return masks


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


def read_subset(path: str | Path) -> Subset:
    """A manifest dir (or its subset.json)."""
    root = Path(path)
    root = root.parent if root.name == META else root
    if not (root / META).is_file():
        raise DatasetError(f"data.subset={path}: no {META} there (task=curate writes one)")
    meta = json.loads((root / META).read_text())
    if meta.get("format") != FORMAT:
        raise DatasetError(f"{root / META} is not a subset manifest (format {meta.get('format')!r})")
    kept = np.load(root / KEPT)
    if kept.size != meta["num_kept"]:
        raise DatasetError(f"{root}: {KEPT} holds {kept.size} indices, {META} says {meta['num_kept']}: damaged manifest")
    return Subset(root, meta, kept)
