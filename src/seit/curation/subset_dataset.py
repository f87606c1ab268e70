"""``task.write_dataset``: the kept samples of a subset as a token dataset of their own.

For when a copy is wanted (shipping the subset, or a loader without manifests): the curated split
is rewritten shard by shard with the same codec, chunking and shard size; the other splits, the
codebook, the codec model and the synonym table are copied as they are.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from seit.data.dataset_info import INFO_FILE, SHARD_DIR, TokenDatasetInfo, upgraded_meta, write_dataset_info
from seit.data.shard_reader import load_shard, read_shard
from seit.data.shard_writer import write_shard
from seit.utils.io import atomic_write_bytes

META_FILES = ("codebook_file", "synonyms_file")


def write_subset_dataset(info: TokenDatasetInfo, subset, out: str | Path) -> Path:
    out = Path(out)
    if (out / INFO_FILE).is_file():
        raise FileExistsError(f"task.write_dataset={out} already holds a dataset; pick a new path")
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    masks, codec = subset.shard_masks(info), info.load_codec()
    per_shard = int(max(s["count"] for s in info.shards(subset.split)))
    chunk = int(info.meta["chunk_size"])
    records, buf = [], {"ids": [], "labels": [], "keys": []}

    def flush(final: bool) -> None:
        while sum(len(k) for k in buf["keys"]) >= per_shard or (final and buf["keys"]):
            ids, labels = np.concatenate(buf["ids"]), np.concatenate(buf["labels"])
            keys = [k for part in buf["keys"] for k in part]
            name = f"{subset.split}-{len([r for r in records if r['split'] == subset.split]):06d}.tar"
            rec = write_shard(out / SHARD_DIR / name, ids[:per_shard], labels[:per_shard], keys[:per_shard],
                              split=subset.split, codec=codec, codebook_size=info.codebook_size, chunk_size=chunk)
            records.append(rec.to_dict())
            rest = keys[per_shard:]
            buf.update(ids=[ids[per_shard:]] if rest else [], labels=[labels[per_shard:]] if rest else [],
                       keys=[rest] if rest else [])

    for shard in info.meta["shards"]:
        spec = info.spec(shard)
        if shard["split"] != subset.split:  # copied as they are, once the reader has checked them
            list(read_shard(spec, codec))
            atomic_write_bytes(out / SHARD_DIR / shard["name"], load_shard(spec))
            records.append(dict(shard))
            continue
        mask, pos = masks[spec.path], 0
        for c in read_shard(spec, codec):
            rows = np.flatnonzero(mask[pos:pos + len(c)])
            pos += len(c)
            buf["ids"].append(c.ids[rows])
            buf["labels"].append(c.labels[rows])
            buf["keys"].append([c.keys[i] for i in rows])
        flush(final=False)
    flush(final=True)
    for f in info.root.iterdir():  # codebook, synonyms, codec model: everything but shards and dataset.json
        if f.is_file() and f.name != INFO_FILE and not f.name.startswith("."):
            shutil.copy2(f, out / f.name)
    m = upgraded_meta(info.meta)  # embed_dim (written before the rename) -> codebook_dim
    extra = {k: v for k, v in m.items() if k not in ("format", "version", "num_samples", "splits", "grid", "codebook_size",
                                                     "codebook_dim", "codec", "chunk_size", "codebook_sha256",
                                                     "classes", "shards", "source_bytes", "bytes_on_disk",
                                                     "bytes_per_sample", "percent_of_source")}
    extra["subset_of"] = {"dataset": str(info.root), "manifest": str(subset.root), "split": subset.split,
                          "kept": subset.meta["num_kept"], "total": subset.meta["num_total"]}
    write_dataset_info(out, shards=records, grid=info.grid, codebook_size=info.codebook_size,
                       codebook_dim=info.codebook_dim, codec=info.codec, chunk_size=chunk,
                       codebook_sha256=info.fingerprint, classes=info.classes, source_bytes=0, **extra)
    return out
