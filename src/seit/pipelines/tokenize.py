"""``task=tokenize``: images -> a token dataset directory.

Work is planned as a fixed list of shards (images sorted, then shuffled with a fixed seed so
that every shard mixes all classes; ``shard_size`` per shard), so the
result does not depend on how many processes run or how often the job was interrupted: every
shard is written atomically with a progress record, a re-run skips the shards already done, and
``dataset.json`` is written last. The plan and the fitted tokenizer are saved first, and a re-run
that would produce something different from the interrupted one refuses to mix the two.

A codec with a per-dataset model (``ctx-rans``) gets it fitted before the first shard, from the
ids of the first ``data.build.codec_fit_samples`` shuffled training images, and saved once in the
dataset dir; a resumed run reuses that file (its sha256 is part of the plan).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from seit.data.dataset_info import (CODEBOOK_FILE, DatasetError, INFO_FILE, SHARD_DIR, SYNONYMS_FILE, TokenDatasetInfo,
                                    save_codebook, save_synonyms, write_dataset_info)
from seit.data.codec import MODEL_CODECS, Codec, get_codec
from seit.data.codec_ctx import MODEL_FILE, CtxModel
from seit.data.embedded import resolve_source
from seit.data.image_source import ImageReadError, ImageRecord, load_image, scan_source
from seit.data.shard_writer import write_shard
from seit.data.storage_report import format_report, storage_report
from seit.tokenizers import PatchKMeansTokenizer, Tokenizer, load_tokenizer
from seit.tokenizers.codebook_tools import synonyms
from seit.utils.io import atomic_write_json, sha256_file

log = logging.getLogger(__name__)
PROGRESS_DIR = ".progress"
_ENCODE_BATCH = 64


def tokenizer_path(cfg) -> Path:
    """Where the tokenizer lives: a given seit checkpoint, else beside the dataset dir.

    A fitted tokenizer, and a foreign checkpoint converted to ours (taming VQGAN), are saved
    there once, so that resumed runs and worker processes load exactly the same one.
    """
    if cfg.tokenizer.checkpoint and cfg.tokenizer.kind != "taming_vqgan":
        return Path(cfg.tokenizer.checkpoint)
    root = Path(cfg.data.root)
    return root.parent / f"{root.name}.tokenizer.safetensors"


def fit_tokenizer(cfg, records: list[ImageRecord]) -> Tokenizer:
    t = cfg.tokenizer
    if t.kind != PatchKMeansTokenizer.kind:
        raise ValueError(f"a {t.kind!r} tokenizer is not fitted by tokenize: train one with task=train_tokenizer "
                         "(or bring one) and pass tokenizer.checkpoint=PATH")
    rng = np.random.default_rng(t.seed)
    pick = rng.choice(len(records), size=min(t.fit_images, len(records)), replace=False)
    images = []
    for i in tqdm(sorted(pick), desc="fit: load images"):
        try:
            images.append(load_image(records[i], t.image_size))
        except ImageReadError:
            if not cfg.data.build.skip_bad_images:
                raise
    images = torch.from_numpy(np.stack(images)).float() / 255
    log.info("fitting %s tokenizer (K=%d, D=%d, patch %d) on %d images", t.kind, t.codebook_size, t.embed_dim,
             t.patch_size, len(images))
    tokenizer = PatchKMeansTokenizer.fit(images, patch_size=t.patch_size, codebook_size=t.codebook_size,
                                         embed_dim=t.embed_dim, max_patches=t.fit_patches, iters=t.fit_iters,
                                         seed=t.seed)
    if t.compact:
        counts = torch.bincount(tokenizer.encode(images).reshape(-1), minlength=tokenizer.codebook_size)
        tokenizer = tokenizer.compacted(counts)
        log.info("compaction: %d of %d codes used on the fit images", tokenizer.codebook_size, t.codebook_size)
    return tokenizer


def obtain_tokenizer(cfg, train_records: list[ImageRecord]) -> tuple[Tokenizer, Path]:
    path = tokenizer_path(cfg)
    if path.is_file():
        tokenizer = load_tokenizer(path)
        log.info("tokenizer: %s (%s, codebook %s…)", path, tokenizer.kind, tokenizer.fingerprint[:12])
    elif cfg.tokenizer.kind == "taming_vqgan":
        from seit.tokenizers.taming_vqgan import from_taming_checkpoint

        tokenizer = from_taming_checkpoint(cfg.tokenizer.checkpoint, cfg.tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(path)
        log.info("converted the taming VQGAN %s to %s", cfg.tokenizer.checkpoint, path)
    elif cfg.tokenizer.checkpoint:
        raise FileNotFoundError(f"tokenizer.checkpoint={path} does not exist")
    else:
        tokenizer = fit_tokenizer(cfg, train_records)
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(path)
        log.info("fitted tokenizer saved to %s", path)
    if getattr(tokenizer, "any_size", False):  # fully convolutional: runs at the configured size
        tokenizer.image_size = int(cfg.tokenizer.image_size)
    margin = float(cfg.tokenizer.get("copy_margin") or 0.0)
    if margin:
        if not hasattr(tokenizer, "copy_margin"):
            raise ValueError(f"tokenizer.copy_margin is for learned VQ tokenizers, not {tokenizer.kind!r}")
        tokenizer.copy_margin = margin
    if tokenizer.image_size != cfg.tokenizer.image_size:
        log.warning("the tokenizer at %s works at %d px, not tokenizer.image_size=%d; using %d", path,
                    tokenizer.image_size, cfg.tokenizer.image_size, tokenizer.image_size)
    return tokenizer, path


# --- worker side: one shard per call --------------------------------------------------------
_WORKER_TOKENIZER: Tokenizer | None = None
_WORKER_CODEC: Codec | None = None


def _init_worker(path: str, image_size: int, copy_margin: float, codec: str, model_dir: str) -> None:
    global _WORKER_TOKENIZER, _WORKER_CODEC
    torch.set_num_threads(1)
    _WORKER_TOKENIZER = load_tokenizer(path)
    _WORKER_TOKENIZER.image_size = image_size
    if copy_margin:
        _WORKER_TOKENIZER.copy_margin = copy_margin
    _WORKER_CODEC = get_codec(codec, model_dir=model_dir)


def _encode_records(tokenizer: Tokenizer, records: list[ImageRecord], skip_bad_images: bool):
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


def _encode_shard(job: dict) -> dict:
    tokenizer = _WORKER_TOKENIZER
    ids, labels, keys, skipped = _encode_records(tokenizer, job["records"], job["skip_bad_images"])
    record = write_shard(job["path"], ids, labels, keys, split=job["split"], codec=_WORKER_CODEC,
                         codebook_size=tokenizer.codebook_size, chunk_size=job["chunk_size"],
                         skipped=len(skipped)).to_dict()
    record["skipped_samples"] = skipped
    atomic_write_json(job["progress"], record)
    return record


# --- driver -----------------------------------------------------------------------------------
def _listing_hash(splits: dict[str, list[ImageRecord]]) -> str:
    h = hashlib.sha256()
    for name, recs in splits.items():
        for r in recs:
            h.update(f"{name}\t{r.key}\t{r.label}\n".encode())
    return h.hexdigest()


def _check_plan(progress: Path, plan: dict, save: bool = True) -> None:
    """Refuse a plan that differs from the interrupted run's in any of its keys; save it if new (and save)."""
    plan_path = progress / "plan.json"
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        diff = sorted(k for k in plan if old.get(k) != plan[k])
        if diff:
            raise ValueError(f"{progress.parent} holds an interrupted tokenize run with different settings "
                             f"({', '.join(diff)}); resume it with the same settings, or pick another data.root")
    elif save:
        atomic_write_json(plan_path, plan)


def codec_model(root: Path, tokenizer: Tokenizer, records: list[ImageRecord], total: int, build) -> str:
    """Fit the codec model on the first records' ids and save it in root, unless a resumed run did; its sha256.

    ``total``: how many samples it will code, which sets how large a model pays for itself.
    """
    path = root / MODEL_FILE
    if not path.is_file():
        sample = records[: build.codec_fit_samples]
        log.info("fitting the %s codec model on the ids of %d images", build.codec, len(sample))
        ids = _encode_records(tokenizer, sample, build.skip_bad_images)[0]
        CtxModel.fit(ids, tokenizer.codebook_size, total_samples=total).save(path)
    return sha256_file(path)


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


def check_built_by(info: TokenDatasetInfo, checkpoint: str, copy_margin: float = 0.0) -> None:
    """A finished dataset must come from the tokenizer checkpoint (and copy margin) the config names.

    Without this check a second learned tokenizer whose data.root name parts match (same kind,
    size, grid) would silently reuse the first one's tokens.
    """
    info.check_fingerprint(load_tokenizer(checkpoint).fingerprint,
                           f"tokenizer.checkpoint={checkpoint} (build its tokens under another data.root)")
    built = float(info.meta.get("tokenizer", {}).get("copy_margin", 0.0))
    if built != float(copy_margin or 0.0):
        raise DatasetError(f"{info.root} was tokenized with tokenizer.copy_margin={built}, not {copy_margin}: "
                           "build these tokens under another data.root")


def tokenize(cfg) -> dict:
    """Build (or finish building) the token dataset at cfg.data.root; returns its dataset.json."""
    with exclusive(Path(cfg.data.root)):
        return _tokenize(cfg)


def _tokenize(cfg) -> dict:
    root = Path(cfg.data.root)
    build = cfg.data.build
    if (root / INFO_FILE).is_file():
        info = TokenDatasetInfo.open(root)
        if cfg.tokenizer.get("checkpoint"):
            check_built_by(info, cfg.tokenizer.checkpoint, cfg.tokenizer.get("copy_margin"))
        meta = info.meta
        log.info("%s already complete (%d samples); nothing to do", root, meta["num_samples"])
        return meta
    if not build.source:
        raise ValueError(f"no token dataset at {root} and no data.build.source to build it from")
    source = resolve_source(str(build.source), cfg.paths.cache_dir)
    splits, classes = scan_source(source)
    for recs in splits.values():  # mix classes across shards: resampled shards then give mixed batches
        np.random.default_rng(build.shuffle_seed).shuffle(recs)
    tokenizer, tok_path = obtain_tokenizer(cfg, splits.get("train") or next(iter(splits.values())))

    progress = root / PROGRESS_DIR
    (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    progress.mkdir(exist_ok=True)
    plan = {"source": os.path.abspath(source), "listing_sha256": _listing_hash(splits),
            "codebook_sha256": tokenizer.fingerprint, "shard_size": build.shard_size,
            "chunk_size": build.chunk_size, "codec": build.codec, "shuffle_seed": build.shuffle_seed}
    margin = float(getattr(tokenizer, "copy_margin", 0.0))
    if margin:  # the same tokenizer gives other ids under another margin: a resume must not mix them
        plan["copy_margin"] = margin
    codec_fields = {}
    if build.codec in MODEL_CODECS:
        _check_plan(progress, plan, save=False)  # before a model is fitted into a dir it does not belong to
        plan["codec_model_sha256"] = codec_model(root, tokenizer, splits.get("train") or next(iter(splits.values())),
                                                 sum(map(len, splits.values())), build)
        codec_fields = {"codec_model": MODEL_FILE}
    else:
        get_codec(build.codec)  # an unknown name fails here, before any work
    _check_plan(progress, plan)
    fingerprint = save_codebook(root / CODEBOOK_FILE, tokenizer.codebook)
    synonym_fields = {}
    if build.synonyms_k:
        save_synonyms(root / SYNONYMS_FILE, synonyms(tokenizer.codebook, build.synonyms_k))
        synonym_fields = {"synonyms_file": SYNONYMS_FILE, "synonyms_k": build.synonyms_k}

    jobs, done = [], []
    for split, recs in splits.items():
        for s, start in enumerate(range(0, len(recs), build.shard_size)):
            name = f"{split}-{s:06d}.tar"
            job = {"path": str(root / SHARD_DIR / name), "progress": str(progress / f"{name}.json"),
                   "split": split, "records": recs[start : start + build.shard_size],
                   "chunk_size": build.chunk_size, "skip_bad_images": build.skip_bad_images}
            if Path(job["path"]).is_file() and Path(job["progress"]).is_file():
                done.append(json.loads(Path(job["progress"]).read_text()))
            else:
                jobs.append(job)
    total = sum(len(r) for r in splits.values())
    if done:
        log.info("resuming: %d of %d shards already written", len(done), len(done) + len(jobs))
    bar = tqdm(total=total, initial=sum(d["count"] + d["skipped"] for d in done), desc="tokenize", unit="img")
    if build.workers > 0 and len(jobs) > 1:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(build.workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(str(tok_path), tokenizer.image_size, margin, build.codec,
                                           str(root))) as pool:
            for record in pool.map(_encode_shard, jobs):
                done.append(record)
                bar.update(record["count"] + record["skipped"])
    else:
        _init_worker(str(tok_path), tokenizer.image_size, margin, build.codec, str(root))
        for job in jobs:
            done.append(_encode_shard(job))
            bar.update(done[-1]["count"] + done[-1]["skipped"])
    bar.close()

    order = {n: i for i, n in enumerate(splits)}
    done.sort(key=lambda r: (order[r["split"]], r["name"]))
    skipped = [s for r in done for s in r.pop("skipped_samples")]
    fields = dict(
        shards=done, grid=tokenizer.grid, codebook_size=tokenizer.codebook_size,
        embed_dim=int(tokenizer.codebook.shape[1]), codec=build.codec, chunk_size=build.chunk_size,
        codebook_sha256=fingerprint, classes=classes, image_size=tokenizer.image_size,
        tokenizer={"kind": tokenizer.kind, "checkpoint": str(tok_path.resolve()),
                   **({"copy_margin": margin} if margin else {})},
        skipped={"count": len(skipped), "samples": skipped}, source=os.path.abspath(source),
        source_bytes=sum(_size(r) for recs in splits.values() for r in recs), **synonym_fields, **codec_fields)
    meta = write_dataset_info(root, **fields)
    if build.storage_report and meta["num_samples"]:
        storage = storage_report(TokenDatasetInfo.open(root), meta["source_bytes"] / meta["num_samples"],
                                 max_samples=build.storage_report_samples)
        meta = write_dataset_info(root, **fields, storage=storage)
        print(format_report(storage), flush=True)
    shutil.rmtree(progress)
    print_summary(meta)
    return meta


def _size(record: ImageRecord) -> int:
    return record.size if record.offset >= 0 else os.path.getsize(record.path)


def print_summary(meta: dict) -> None:
    line = (f"token dataset: {meta['num_samples']} samples, grid {meta['grid'][0]}x{meta['grid'][1]}, "
            f"K={meta['codebook_size']}, {meta['bytes_on_disk']:,} bytes on disk = "
            f"{meta['bytes_per_sample']:.1f} B/sample")
    if "percent_of_source" in meta:
        line += f" = {meta['percent_of_source']:.2f}% of the {meta['source_bytes']:,} source bytes"
    if meta["skipped"]["count"]:
        line += f"; skipped {meta['skipped']['count']} unreadable images (listed in dataset.json)"
    print(line, flush=True)
