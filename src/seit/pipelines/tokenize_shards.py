"""Tokenize's shard work: encode a shard's images, in worker processes or in the driver.

Workers are spawned processes that load the tokenizer and codec once; each call writes one
shard atomically, then its progress record. They die with the driver (PR_SET_PDEATHSIG on
Linux), so a killed run leaves no process finishing shards behind it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from seit.data.codec import Codec, get_codec
from seit.data.dataset_info import SHARD_DIR
from seit.data.image_source import ImageReadError, ImageRecord, load_image
from seit.data.parity import parity_path_for, write_parity
from seit.data.shard_writer import encode_shard
from seit.pipelines.tokenize_plan import PROGRESS_DIR, records_hash
from seit.tokenizers import Tokenizer, load_tokenizer
from seit.utils.io import atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)
_ENCODE_BATCH = 64
_PR_SET_PDEATHSIG = 1


_WORKER_TOKENIZER: Tokenizer | None = None
_WORKER_CODEC: Codec | None = None


def _die_with_parent(parent_pid: int) -> None:
    """A killed driver takes its workers along: none finishes a shard into a run nobody watches."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _init_worker(path: str, image_size: int, copy_margin: float, codec: str, model_dir: str,
                 parent_pid: int | None = None) -> None:
    global _WORKER_TOKENIZER, _WORKER_CODEC
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    torch.set_num_threads(1)
    _WORKER_TOKENIZER = load_tokenizer(path)
    _WORKER_TOKENIZER.image_size = image_size
    if copy_margin:
        _WORKER_TOKENIZER.copy_margin = copy_margin
    _WORKER_CODEC = get_codec(codec, model_dir=model_dir)


def encode_records(tokenizer: Tokenizer, records: list[ImageRecord], skip_bad_images: bool):
    """ids [n,H,W], labels, keys of the readable records, and where the unreadable ones are."""
    ids, labels, keys, skipped = [], [], [], []
    for start in range(0, len(records), _ENCODE_BATCH):
        batch, batch_records = [], []
        for rec in records[start : start + _ENCODE_BATCH]:
            try:
                batch.append(load_image(rec, tokenizer.image_size))
            except ImageReadError as exc:
                if not skip_bad_images:
                    raise ImageReadError(f"{exc} (pass data.build.skip_bad_images=true to skip and count such images)") from None
                skipped.append(rec.where)
                continue
            batch_records.append(rec)
        if batch:
            with torch.inference_mode():
                ids.append(tokenizer.encode(torch.from_numpy(np.stack(batch)).float() / 255).numpy())
            labels += [r.label for r in batch_records]
            keys += [r.key for r in batch_records]
    ids = np.concatenate(ids) if ids else np.zeros((0, *tokenizer.grid), np.uint16)
    return ids, np.asarray(labels, np.int64), keys, skipped


def make_shard(tokenizer: Tokenizer, codec: Codec, job: dict) -> tuple[bytes, dict]:
    """A shard's bytes and its progress record (its dataset.json entry plus where the skipped images are).

    The entry also holds ``records_sha256`` (of the planned keys and labels, so a later rebuild
    can check that the source still assigns this shard the same images) and ``unlabelled`` (how
    many of its samples have label -1).
    """
    ids, labels, keys, skipped = encode_records(tokenizer, job["records"], job["skip_bad_images"])
    data, record = encode_shard(Path(job["path"]).name, ids, labels, keys, split=job["split"], codec=codec,
                                codebook_size=tokenizer.codebook_size, chunk_size=job["chunk_size"],
                                skipped=len(skipped))
    return data, {**record.to_dict(), "unlabelled": int((labels < 0).sum()),
                  "records_sha256": records_hash(job["records"]), "skipped_samples": skipped}


def _encode_shard(job: dict) -> dict:
    data, record = make_shard(_WORKER_TOKENIZER, _WORKER_CODEC, job)
    atomic_write_bytes(job["path"], data)
    if job["parity"]:
        path = Path(job["path"])
        record["parity"] = write_parity(path, parity_path_for(path.parent.parent, path.name), job["parity"])
    atomic_write_json(job["progress"], record)
    return record


def run_shards(cfg, root: Path, shards: dict, tok_path: Path, tokenizer: Tokenizer, margin: float) -> list[dict]:
    """Write the shards not yet done (a finished one is re-checked against its record); all records, in order."""
    build, progress = cfg.data.build, root / PROGRESS_DIR
    jobs, done = [], []
    for name, (split, records) in shards.items():
        job = {"path": str(root / SHARD_DIR / name), "progress": str(progress / f"{name}.json"), "split": split,
               "records": records, "chunk_size": build.chunk_size, "skip_bad_images": build.skip_bad_images,
               "parity": float(build.get("parity") or 0.0)}
        record = finished_shard(Path(job["path"]), Path(job["progress"]))
        (done.append(record) if record else jobs.append(job))
    if done:
        log.info("resuming: %d of %d shards already written", len(done), len(shards))
    bar = tqdm(total=sum(len(r) for _, r in shards.values()), initial=sum(d["count"] + d["skipped"] for d in done),
               desc="tokenize", unit="img")
    init = (str(tok_path), tokenizer.image_size, margin, build.codec, str(root))
    if build.workers > 0 and len(jobs) > 1:
        with ProcessPoolExecutor(build.workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(*init, os.getpid())) as pool:
            for record in pool.map(_encode_shard, jobs):
                done.append(record)
                bar.update(record["count"] + record["skipped"])
    else:
        _init_worker(*init)
        for job in jobs:
            done.append(_encode_shard(job))
            bar.update(done[-1]["count"] + done[-1]["skipped"])
    bar.close()
    order = {name: i for i, name in enumerate(shards)}
    return sorted(done, key=lambda r: order[r["name"]])


def finished_shard(path: Path, progress: Path) -> dict | None:
    """The progress record of a shard an interrupted run finished, if the file still matches it."""
    if not (path.is_file() and progress.is_file()):
        return None
    record = json.loads(progress.read_text())
    if "records_sha256" not in record:  # finished by a version that did not record its listing: encode it again
        return None
    if path.stat().st_size != record["bytes"] or sha256_file(path) != record["sha256"]:
        log.warning("shard %s does not match its progress record (size or sha256): rebuilding it", path.name)
        return None
    parity = record.get("parity") and parity_path_for(path.parent.parent, path.name)
    if parity and not (parity.is_file() and sha256_file(parity) == record["parity"]["sha256"]):
        log.warning("the parity file of shard %s does not match its progress record: rebuilding both", path.name)
        return None
    return record
