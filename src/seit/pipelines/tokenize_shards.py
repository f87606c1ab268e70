"""Tokenize's shard work: decode images in DataLoader workers, encode on the tokenizer's device,
write each shard atomically with its progress record.

Images are decoded and resized in ``data.build.workers`` DataLoader processes (they die with the
driver). The driver encodes batches of ``ENCODE_BATCH`` images on the encoder's device (a GPU, in
bf16 where the tokenizer allows it; on the CPU the workers encode too, one thread each, so every
core both decodes and encodes) and hands each finished shard to a writer thread, which codes
it (the codecs release the GIL), writes it atomically and then its progress record, while the
next batches encode. Batches are cut from each shard's own start, so a shard's bytes depend on its
images, the device kind and the precision, never on which rank wrote it or how many ranks there
were. Each rank takes the shards ``i % world == rank`` of the plan.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from seit.data.codec import Codec
from seit.data.dataset_info import SHARD_DIR
from seit.data.image_source import ImageReadError, ImageRecord, load_image
from seit.data.parity import parity_path_for, write_parity
from seit.data.shard_writer import encode_shard
from seit.pipelines.tokenize_plan import PROGRESS_DIR, records_hash
from seit.tokenizers.base import ImageEncoder
from seit.utils.io import atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)
ENCODE_BATCH = 64  # images per encoder call; also how a shard is cut, so it is part of the bytes
_WRITES_IN_FLIGHT = 2  # finished shards held for the writer: bounds the ids kept in memory


class ShardBatches(Dataset):
    """Item i: batch i's images decoded and resized, uint8 ``[n, 3, S, S]`` (None when none was
    readable), the positions in the batch of the images that were, and where the unreadable ones are.
    With an ``encoder`` (a CPU one), the item holds their ids ``[n, H, W]`` instead of the images.

    An unreadable image without ``skip_bad_images`` comes back as ``error`` (its one-line message):
    raised in the driver, so the error is not wrapped in a worker's traceback.
    """

    def __init__(self, batches: list[list[ImageRecord]], image_size: int, skip_bad_images: bool,
                 encoder: ImageEncoder | None = None):
        self.batches, self.image_size, self.skip_bad_images = batches, image_size, skip_bad_images
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        images, kept, skipped = [], [], []
        for j, rec in enumerate(self.batches[i]):
            try:
                images.append(load_image(rec, self.image_size))
            except ImageReadError as exc:
                if not self.skip_bad_images:
                    return {"error": f"{exc} (pass data.build.skip_bad_images=true to skip and count such images)"}
                skipped.append(rec.where)
                continue
            kept.append(j)
        images = torch.from_numpy(np.stack(images)) if images else None
        out = {"error": None, "images": images, "kept": kept, "skipped": skipped}
        if self.encoder is not None and images is not None:
            out.update(images=None, ids=self.encoder(images))
        return out


def cut(records: list[ImageRecord]) -> list[list[ImageRecord]]:
    """A shard's (or any record list's) encoder batches, from its start."""
    return [records[s : s + ENCODE_BATCH] for s in range(0, len(records), ENCODE_BATCH)]


def encoded(batches: list[list[ImageRecord]], encoder: ImageEncoder, skip_bad_images: bool, workers: int):
    """Per batch, in order: its ids (numpy ``[n, H, W]``, None when no image was readable), the positions
    of the readable images, and where the unreadable ones are. ``workers`` processes decode (0: here);
    a CPU encoder runs in them as well."""
    in_workers = workers > 0 and encoder.encode_device.type == "cpu"
    dataset = ShardBatches(batches, encoder.tokenizer.image_size, skip_bad_images, encoder if in_workers else None)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
                        pin_memory=encoder.encode_device.type == "cuda")
    for item in loader:
        if item["error"]:
            raise ImageReadError(item["error"])
        ids = item.get("ids")
        if ids is None and item["images"] is not None:
            ids = encoder(item["images"])
        yield (ids.numpy() if ids is not None else None), item["kept"], item["skipped"]


def encode_records(encoder: ImageEncoder, records: list[ImageRecord], skip_bad_images: bool, workers: int = 0):
    """ids ``[n, H, W]`` (uint16 when the codebook fits), labels, keys of the readable records, and where
    the unreadable ones are."""
    ids, labels, keys, skipped = [], [], [], []
    batches = cut(records)
    for batch, (batch_ids, kept, batch_skipped) in zip(batches, encoded(batches, encoder, skip_bad_images, workers)):
        skipped += batch_skipped
        if batch_ids is None:
            continue
        ids.append(batch_ids)
        labels += [batch[j].label for j in kept]
        keys += [batch[j].key for j in kept]
    ids = np.concatenate(ids) if ids else np.zeros((0, *encoder.tokenizer.grid), np.uint16)
    return ids, np.asarray(labels, np.int64), keys, skipped


def shard_bytes(job: dict, ids: np.ndarray, labels: np.ndarray, keys: list[str], skipped: list[str], codec: Codec,
                codebook_size: int) -> tuple[bytes, dict]:
    """A shard's bytes and its progress record (its dataset.json entry plus where the skipped images are).

    The entry also holds ``records_sha256`` (of the planned keys and labels, so a later rebuild
    can check that the source still assigns this shard the same images) and ``unlabelled`` (how
    many of its samples have label -1).
    """
    data, record = encode_shard(Path(job["path"]).name, ids, labels, keys, split=job["split"], codec=codec,
                                codebook_size=codebook_size, chunk_size=job["chunk_size"], skipped=len(skipped))
    return data, {**record.to_dict(), "unlabelled": int((labels < 0).sum()),
                  "records_sha256": records_hash(job["records"]), "skipped_samples": skipped}


def make_shard(encoder: ImageEncoder, codec: Codec, job: dict, workers: int = 0) -> tuple[bytes, dict]:
    """One shard's bytes and record, from its images (the rebuild from source)."""
    ids, labels, keys, skipped = encode_records(encoder, job["records"], job["skip_bad_images"], workers)
    return shard_bytes(job, ids, labels, keys, skipped, codec, encoder.tokenizer.codebook_size)


def _write(job: dict, parts: tuple, codec: Codec, codebook_size: int) -> dict:
    data, record = shard_bytes(job, *parts, codec, codebook_size)
    atomic_write_bytes(job["path"], data)
    if job["parity"]:
        path = Path(job["path"])
        record["parity"] = write_parity(path, parity_path_for(path.parent.parent, path.name), job["parity"])
    atomic_write_json(job["progress"], record)
    return record


def shard_jobs(cfg, root: Path, shards: dict) -> list[dict]:
    """Every planned shard as a job: its split, records, output path and progress record path."""
    build, progress = cfg.data.build, root / PROGRESS_DIR
    return [{"path": str(root / SHARD_DIR / name), "progress": str(progress / f"{name}.json"), "split": split,
             "records": records, "chunk_size": build.chunk_size, "skip_bad_images": build.skip_bad_images,
             "parity": float(build.get("parity") or 0.0)} for name, (split, records) in shards.items()]


def run_shards(jobs: list[dict], encoder: ImageEncoder, codec: Codec, build, rank: int = 0, world: int = 1) -> list[dict]:
    """Write this rank's shards (``i % world == rank``) that are not yet done; a finished one is
    re-checked against its record. Returns this rank's records (the finished ones included), in plan
    order. ``build``: ``data.build`` (``workers``, ``skip_bad_images``)."""
    mine = [job for i, job in enumerate(jobs) if i % world == rank]
    todo, done = [], []
    for job in mine:
        record = finished_shard(Path(job["path"]), Path(job["progress"]))
        (done.append(record) if record else todo.append(job))
    if done:
        log.info("resuming: %d of %d shards%s already written", len(done), len(mine),
                 f" of rank {rank}" if world > 1 else "")
    images = sum(len(j["records"]) for j in todo)
    where = f" (rank {rank} of {world})" if world > 1 else ""
    bar = tqdm(total=sum(len(j["records"]) for j in mine), initial=sum(d["count"] + d["skipped"] for d in done),
               desc=f"tokenize{where} on {encoder.encode_device.type} {encoder.precision}", unit="img",
               disable=None if rank == 0 else True)
    start = time.perf_counter()
    batches = [(k, b) for k, job in enumerate(todo) for b in cut(job["records"])]
    parts: dict[int, list] = {}
    pending: deque[Future] = deque()
    left = {k: len(cut(job["records"])) for k, job in enumerate(todo)}
    with ThreadPoolExecutor(1, thread_name_prefix="shard-writer") as writer:
        stream = encoded([b for _, b in batches], encoder, build.skip_bad_images, build.workers)
        for (k, batch), (batch_ids, kept, batch_skipped) in zip(batches, stream):
            ids, labels, keys, skipped = parts.setdefault(k, [[], [], [], []])
            skipped += batch_skipped
            if batch_ids is not None:
                ids.append(batch_ids)
                labels += [batch[j].label for j in kept]
                keys += [batch[j].key for j in kept]
            bar.update(len(batch))
            left[k] -= 1
            if left[k]:
                continue
            ids, labels, keys, skipped = parts.pop(k)
            ids = np.concatenate(ids) if ids else np.zeros((0, *encoder.tokenizer.grid), np.uint16)
            while len(pending) >= _WRITES_IN_FLIGHT:
                done.append(pending.popleft().result())
            pending.append(writer.submit(_write, todo[k], (ids, np.asarray(labels, np.int64), keys, skipped), codec,
                                         encoder.tokenizer.codebook_size))
        done += [f.result() for f in pending]
    bar.close()
    wall = time.perf_counter() - start
    if images:
        log.info("tokenized %d images in %.1fs (%.1f img/s) on %s in %s%s", images, wall, images / wall,
                 encoder.encode_device, encoder.precision, where)
    order = {Path(job["path"]).name: i for i, job in enumerate(mine)}
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
