"""A subset manifest as the loader reads it: which samples of a split to keep, without rewriting a shard.

    DIR/subset.json   dataset, split, split id, method, parameters, counts (written last)
    DIR/subset.tsv    one kept sample a line: key, index in the split, cluster id, score
    DIR/kept.npy      the kept indices (int64, ascending): what the loader reads

The loader turns the indices into per-shard row masks (dataset order is shards as listed, then
rows), so a billion-sample subset costs one bit-sized mask per shard and no key lookups. The
split id ties a manifest to the exact shards it was made from: another dataset, or a rebuilt
one, is refused by name. Reading lives here, beside the data module that trains on a manifest;
``curation.manifest`` writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seit.data.dataset_info import DatasetError, TokenDatasetInfo, split_id

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
