"""``rebuild_shards``: re-make named shards of a finished token dataset, byte for byte, from its source.

This is the repair from source (``task=verify repair=true``). Only what the build recorded is
used: the source path, the settings (``build``), the tokenizer (at its recorded path, or beside the
dataset when both were moved together) and each shard's sha256. A shard is rebuilt only while the
source still assigns it the images (keys and labels) it was built from, so a change elsewhere in the
source does not block it; the new bytes replace the old file only when they hash as recorded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from seit.data.codec import get_codec
from seit.data.dataset_info import INFO_FILE, SHARD_DIR, DatasetError
from seit.data.image_source import list_source
from seit.pipelines.tokenize_plan import exclusive, listing_hash, plan_shards, records_hash, shuffle
from seit.pipelines.tokenize_shards import make_shard
from seit.tokenizers import Tokenizer, load_tokenizer
from seit.tokenizers.base import ImageEncoder, encode_device
from seit.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)


def rebuild_shards(root: Path, names: list[str], device: str | None = None) -> list[dict]:
    """Re-make the named shards of a finished dataset from the source and settings its dataset.json records.

    The tokenizer runs in the precision the build recorded, on ``device`` (see ``encode_device``;
    None: the kind of device the build recorded, the CPU for builds that record none): the bytes
    match on the kind of device the dataset was built on.

    Each new shard must hash to the sha256 dataset.json records before it replaces the file (then
    atomically); otherwise a DatasetError names the shard and the old file stays. Returns the
    shards' dataset.json entries.
    """
    root = Path(root)
    with exclusive(root):
        meta, plan, shards = _rebuild_plan(root, names)
        tokenizer = built_tokenizer(root, meta)
        tokenizer.image_size = int(meta["image_size"])
        if meta["tokenizer"].get("copy_margin"):
            tokenizer.copy_margin = float(meta["tokenizer"]["copy_margin"])
        codec = get_codec(meta["codec"], model_dir=root)
        precision = (plan.get("tokenizer") or {}).get("precision", "fp32")
        encoder = ImageEncoder(tokenizer, torch.device("cpu"), encode_device(device or meta["tokenizer"].get("device", "cpu"),
                                                                              what="the rebuild's device"), precision)
        recorded = {s["name"]: s for s in meta["shards"]}
        out = []
        for name in names:
            split, records = shards[name]
            job = {"path": str(root / SHARD_DIR / name), "split": split, "records": records,
                   "chunk_size": plan["chunk_size"], "skip_bad_images": recorded[name].get("skipped", 0) > 0}
            data, record = make_shard(encoder, codec, job)
            record.pop("skipped_samples")
            if record["sha256"] != recorded[name]["sha256"]:
                raise DatasetError(f"rebuilding shard {name} of {root} gave sha256 {record['sha256'][:12]}…, not the "
                                   f"recorded {recorded[name]['sha256'][:12]}…: the source images, the tokenizer or "
                                   f"{INFO_FILE} changed since the build; the old file is kept")
            atomic_write_bytes(job["path"], data)
            log.info("rebuilt shard %s of %s", name, root)
            out.append(record)
        return out


def built_tokenizer(root: Path, meta: dict) -> Tokenizer:
    """The tokenizer the dataset was built with: at its recorded path, or beside the dataset (both moved together)."""
    path = Path(meta["tokenizer"]["checkpoint"])
    beside = Path(os.path.abspath(root)).parent / f"{Path(os.path.abspath(root)).name}.tokenizer.safetensors"
    if not path.is_file() and beside.is_file():
        path = beside
    tokenizer = load_tokenizer(path, what=f"the tokenizer that {root / INFO_FILE} records")
    if tokenizer.fingerprint != meta["codebook_sha256"]:
        raise DatasetError(f"cannot rebuild {root}: the tokenizer {path} does not have the codebook the dataset "
                           "was built with")
    return tokenizer


def _rebuild_plan(root: Path, names: list[str]) -> tuple[dict, dict, dict]:
    """dataset.json, its build plan, and the named shards' records, after checking the source still gives them.

    Each named shard's planned (key, label) list must hash to its recorded ``records_sha256``, so
    a change elsewhere in the source (another split) does not block it; a dataset built before
    that field was recorded needs the whole listing unchanged.
    """
    meta = json.loads((root / INFO_FILE).read_text())
    plan = meta.get("build")
    if plan is None:
        raise DatasetError(f"{root / INFO_FILE} records no build settings (it predates them): its shards cannot be "
                           "rebuilt; tokenize its source again under another data.root")
    recorded = {s["name"]: s for s in meta["shards"]}
    unknown = sorted(set(names) - set(recorded))
    if unknown:
        raise DatasetError(f"{root / INFO_FILE} lists no shard(s) {unknown[:5]}")
    source = meta["source"]
    if not Path(source).is_dir():
        raise DatasetError(f"cannot rebuild shards of {root}: its source {source} is gone")
    listing = list_source(source)
    shuffle(listing, plan["shuffle_seed"])
    shards = plan_shards(listing.splits, plan["shard_size"])
    for name in names:
        want = recorded[name].get("records_sha256")
        if want is None:
            if listing_hash(listing.splits) != plan["listing_sha256"]:
                raise DatasetError(f"cannot rebuild shards of {root}: the images in its source {source} changed since "
                                   "it was built (added, removed or relabelled)")
        elif name not in shards or records_hash(shards[name][1]) != want:
            split = recorded[name]["split"]
            raise DatasetError(f"cannot rebuild shard {name} of {root}: its source {source} no longer gives it the "
                               f"images (keys and labels) it was built from: images of split {split} were added, "
                               f"removed or relabelled, and each split is shuffled as a whole before it is cut into "
                               "shards, so one change moves images between all its shards")
    return meta, plan, shards
