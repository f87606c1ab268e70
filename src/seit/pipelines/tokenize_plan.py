"""What a tokenize run will build, settled and checked before anything is written into data.root.

The settings that decide a token dataset's bytes (source, sharding, codec, shuffle seed,
synonyms, tokenizer) form one dict. The plan is that dict plus what the source and the tokenizer
turned out to be (the sha256 of the image listing and of the codebook). It is the first file
written into data.root (``.progress/plan.json``) and ends up in dataset.json as ``build``. So
tokenize never writes into a directory it did not plan, an interrupted run resumes only under
the same plan, and a finished dataset refuses other settings by name instead of saying
"nothing to do". ``plan_shards`` is the one place that cuts the listing into shards, so a shard
rebuilt later gets exactly the images it got the first time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from seit.data.codec import CODECS, MODEL_CODECS
from seit.data.dataset_info import INFO_FILE, SHARD_DIR, DatasetError, upgraded
from seit.data.embedded import source_id
from seit.data.image_source import ImageRecord, SourceListing
from seit.tokenizers import TOKENIZERS, PatchKMeansTokenizer
from seit.tokenizers.base import PRECISIONS, encode_device, encode_precision
from seit.utils.io import atomic_write_json
from seit.utils.ranks import local_rank

PROGRESS_DIR = ".progress"
PLAN_FILE = "plan.json"
# what decides the codebook of a tokenizer that tokenize fits itself
_FIT_KEYS = ("kind", "image_size", "patch_size", "codebook_size", "codebook_dim", "fit_images", "fit_patches",
             "fit_iters", "seed", "compact")
_NAMES = {"listing_sha256": "the source's image listing (images added, removed or relabelled)",
          "codebook_sha256": "the tokenizer's codebook"}


def _require(key: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value} must be {rule}")


def _int(key: str, value, low: int, rule: str) -> None:
    _require(key, value, isinstance(value, int) and not isinstance(value, bool) and value >= low, rule)


def validate_settings(cfg) -> None:
    """Every data.build and tokenizer value that tokenize uses, checked before it writes anything.

    The tokenizer's own sizes come first: the build checks compare against them (synonyms_k <
    codebook_size), and a bad codebook_size must be named as itself, not as synonyms_k.
    """
    b, t = cfg.data.build, cfg.tokenizer
    _validate_tokenizer(t)
    _int("data.build.shard_size", b.shard_size, 1, "an integer > 0")
    _int("data.build.chunk_size", b.chunk_size, 1, "an integer > 0")
    _int("data.build.workers", b.workers, 0, "an integer >= 0")
    stall = b.get("rank_stall_s", 1800)
    _require("data.build.rank_stall_s", stall, isinstance(stall, (int, float)) and stall > 0, "a number of seconds > 0")
    _int("data.build.shuffle_seed", b.shuffle_seed, 0, "an integer >= 0")
    _require("data.build.codec", b.codec, b.codec in CODECS, f"one of {sorted(CODECS)}")
    _int("data.build.codec_fit_samples", b.codec_fit_samples, 1, "an integer > 0")
    _int("data.build.synonyms_k", b.synonyms_k, 0, "an integer >= 0")
    parity = b.get("parity") or 0
    _require("data.build.parity", parity, isinstance(parity, (int, float)) and 0 <= parity <= 1,
             "a fraction in [0, 1] (0 = no parity)")
    _require("data.build.synonyms_k", b.synonyms_k, not b.synonyms_k or b.synonyms_k < t.codebook_size,
             f"< tokenizer.codebook_size={t.codebook_size} (each code's nearest other codes)")
    if b.storage_report:
        _int("data.build.storage_report_samples", b.storage_report_samples, 1, "an integer > 0")


def _validate_tokenizer(t) -> None:
    _int("tokenizer.image_size", t.image_size, 1, "an integer > 0")
    encode_device(t.get("device"), local_rank())  # a device this machine lacks is named before any work
    _require("tokenizer.precision", t.get("precision"), t.get("precision") in (None, *PRECISIONS), f"one of {PRECISIONS}")
    kind = TOKENIZERS.get(t.kind)
    if t.get("precision") == "bf16" and kind is not None and not kind.bf16:
        encode_precision("bf16", kind, torch.device("cpu"))  # raises, naming the tokenizer
    margin = t.get("copy_margin") or 0.0
    _require("tokenizer.copy_margin", margin, isinstance(margin, (int, float)) and margin >= 0, "a number >= 0")
    if t.get("checkpoint"):
        return
    if t.kind != PatchKMeansTokenizer.kind:
        raise ValueError(f"a {t.kind!r} tokenizer is not fitted by tokenize: train one with task=train_tokenizer "
                         "(or bring one) and pass tokenizer.checkpoint=PATH")
    for key, low in (("patch_size", 1), ("codebook_size", 2), ("codebook_dim", 1), ("fit_images", 1),
                     ("fit_patches", 1), ("fit_iters", 0), ("seed", 0)):
        _int(f"tokenizer.{key}", t[key], low, f"an integer >= {low}")
    _require("tokenizer.image_size", t.image_size, t.image_size % t.patch_size == 0,
             f"a multiple of tokenizer.patch_size={t.patch_size}")
    _require("tokenizer.fit_patches", t.fit_patches, t.fit_patches >= t.codebook_size,
             f">= tokenizer.codebook_size={t.codebook_size} (k-means needs a patch per code)")


def settings(cfg, precision: str | None = None) -> dict:
    """The settings a finished dataset is compared against (the plan without what the inputs turned out to be).

    ``precision``: what the encoder runs in (fp32, bf16), as resolved for this machine; without it an
    explicit ``tokenizer.precision`` is compared and ``auto`` accepts what the dataset was built in.
    The device is not a setting: one kind of device gives the same bytes on any number of ranks.
    """
    b, t = cfg.data.build, cfg.tokenizer
    # a given checkpoint is compared by its codebook (the plan's codebook_sha256, check_built_by), not its path
    tok = {"image_size": int(t.image_size), "copy_margin": float(t.get("copy_margin") or 0.0)}
    precision = precision or (t.get("precision") if t.get("precision") not in (None, "auto") else None)
    if precision:
        tok["precision"] = precision
    if not t.get("checkpoint"):
        tok.update({k: t[k] for k in _FIT_KEYS})
    out = {"source": source_id(str(b.source)), "shard_size": b.shard_size, "chunk_size": b.chunk_size,
           "codec": b.codec, "shuffle_seed": b.shuffle_seed, "synonyms_k": b.synonyms_k, "tokenizer": tok}
    if b.codec in MODEL_CODECS:
        out["codec_fit_samples"] = b.codec_fit_samples
    if b.get("parity"):  # recorded only when on, so datasets built before it compare equal
        out["parity"] = float(b.parity)
    return out


def upgraded_plan(plan: dict) -> dict:
    """A plan (or dataset.json's ``build``) with its tokenizer settings under their current names:
    one written before the rename says ``embed_dim`` for what is now ``codebook_dim``."""
    tok = plan.get("tokenizer")
    return {**plan, "tokenizer": upgraded(tok)} if isinstance(tok, dict) else plan


# tokenizer settings recorded only since they exist: a plan without one was built with this value
_UNRECORDED = {"copy_margin": 0.0, "precision": "fp32"}


def differences(old: dict, new: dict) -> list[str]:
    """Each key of ``new`` that ``old`` records otherwise, as ``key=new (built with old)``."""
    out = []
    old = upgraded_plan(old)
    for key, value in new.items():
        if key == "tokenizer":
            was = {**_UNRECORDED, **(old.get(key) or {})}
            out += [f"tokenizer.{k}={v} (built with {was.get(k)})" for k, v in value.items() if was.get(k) != v]
        elif old.get(key) != value:
            out.append(_NAMES.get(key) or f"data.build.{key}={value} (built with {old.get(key)})")
    return out


def shuffle(listing: SourceListing, seed: int) -> None:
    """Mix classes across shards: resampled shards then give mixed batches."""
    for recs in listing.splits.values():
        np.random.default_rng(seed).shuffle(recs)


def listing_hash(splits: dict[str, list[ImageRecord]]) -> str:
    h = hashlib.sha256()
    for name, recs in splits.items():
        for r in recs:
            h.update(f"{name}\t{r.key}\t{r.label}\n".encode())
    return h.hexdigest()


def records_hash(records: list[ImageRecord]) -> str:
    """sha256 of one shard's planned (key, label) list: a rebuild checks just its own shard's images."""
    return hashlib.sha256("".join(f"{r.key}\t{r.label}\n" for r in records).encode()).hexdigest()


def plan_shards(splits: dict[str, list[ImageRecord]], shard_size: int) -> dict[str, tuple[str, list[ImageRecord]]]:
    """shard name -> (split, its records), in dataset order."""
    return {f"{split}-{s:06d}.tar": (split, recs[start : start + shard_size])
            for split, recs in splits.items() for s, start in enumerate(range(0, len(recs), shard_size))}


def check_planned(root: Path) -> None:
    """Refuse a data.root that holds files but no plan: tokenize did not start it, so it is not tokenize's to write."""
    if not root.exists() or (root / PROGRESS_DIR / PLAN_FILE).is_file():
        return
    if not root.is_dir():
        raise DatasetError(f"data.root={root} is not a directory")
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    if found:
        raise DatasetError(f"{root} holds {len(found)} file(s) ({', '.join(found[:3])}) but neither {INFO_FILE} nor "
                           f"a tokenize plan ({PROGRESS_DIR}/{PLAN_FILE}): tokenize did not plan this directory and "
                           "will not write into it; move it away or pick another data.root")


def start_plan(root: Path, plan: dict) -> dict:
    """Save the plan as the first file in root, or check it against the interrupted run's; returns the saved plan."""
    path = root / PROGRESS_DIR / PLAN_FILE
    if path.is_file():
        old = upgraded_plan(json.loads(path.read_text()))
        diff = differences(old, plan)
        if diff:
            raise DatasetError(f"{root} holds an interrupted tokenize run with other settings: {'; '.join(diff)}; "
                               "resume it with the settings it was started with, or pick another data.root")
        return old
    (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, plan)
    return plan


def check_finished(root: Path, meta: dict, wanted: dict) -> None:
    """A finished dataset answers "nothing to do" only to the settings it was built with."""
    built = meta.get("build")
    if built is None:
        return  # built before the settings were recorded: nothing to compare
    diff = differences(built, wanted)
    if diff:
        parity = any(d.startswith("data.build.parity=") for d in diff)
        raise DatasetError(f"{root} is a finished token dataset built with other settings: {'; '.join(diff)}; "
                           "build these under another data.root"
                           + (f" (parity alone: `python run.py task=verify data=tokens data.root={root} parity=F` adds it "
                              "to the finished dataset)" if parity and len(diff) == 1 else ""))


@contextmanager
def exclusive(root: Path):
    """One builder per dataset dir: concurrent jobs (a multirun, several nodes) wait for the first."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
