"""``task=tokenize``: images -> a token dataset directory.

Work is planned as a fixed list of shards (images sorted, then shuffled with a fixed seed so
that every shard mixes all classes; ``shard_size`` per shard), so the
result does not depend on how many processes run or how often the job was interrupted: every
shard is written atomically with a progress record, a re-run re-checks and skips the shards
already done, and ``dataset.json`` is written last, once. The plan (``tokenize_plan``) is the
first file written into data.root; a re-run that would produce something different refuses to
mix the two, and a directory without a plan is never written into. ``rebuild_shards``
(``tokenize_rebuild``) re-makes named shards of a finished dataset byte for byte from its recorded
source and settings.

A codec with a per-dataset model (``ctx-rans``) gets it fitted before the first shard, from the
ids of the first ``data.build.codec_fit_samples`` shuffled training images, and saved once in the
dataset dir; a resumed run reuses that file (its sha256 is part of the plan).

Several ranks (``torchrun --nproc_per_node N run.py task=tokenize``, or srun): rank 0 takes the
dataset's lock, plans, fits what needs fitting and then writes ``.<root>.launch.json`` beside it; every
rank then encodes the shards ``i % world == rank`` on its own device (``tokenizer.device``, the
node's GPU ``LOCAL_RANK``) and rank 0 writes dataset.json once every shard's progress record is
there. The plan does not depend on the rank count, so the bytes equal a one-process run's, and a
rerun with any number of ranks resumes where a dead rank stopped. No process group is needed: the
ranks meet through the dataset directory, as ``task=embed``'s do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from seit.data.codec import MODEL_CODECS, get_codec
from seit.data.codec_ctx import MODEL_FILE, CtxModel
from seit.data.dataset_info import (CODEBOOK_FILE, INFO_FILE, SYNONYMS_FILE, DatasetError, TokenDatasetInfo,
                                    save_codebook, save_synonyms, write_dataset_info)
from seit.data.embedded import resolve_source, source_id
from seit.data.image_source import IMAGE_EXTS, ImageReadError, ImageRecord, SourceListing, list_source, load_image
from seit.data.storage_report import format_report, storage_report
from seit.pipelines.tokenize_plan import (PLAN_FILE, PROGRESS_DIR, check_finished, check_planned, differences,
                                          exclusive, listing_hash, plan_shards, settings, shuffle, start_plan,
                                          validate_settings)
from seit.pipelines.tokenize_rebuild import rebuild_shards  # noqa: F401  (part of task=tokenize's API)
from seit.pipelines.tokenize_shards import encode_records, run_shards, shard_jobs
from seit.tokenizers import PatchKMeansTokenizer, Tokenizer, load_tokenizer
from seit.tokenizers.base import ImageEncoder, encode_device, encode_precision
from seit.tokenizers.codebook_tools import synonyms
from seit.utils.io import atomic_write_bytes, atomic_write_json, sha256_file
from seit.utils.ranks import launch_id, local_rank, rank_world, wait_for

log = logging.getLogger(__name__)
_IGNORED_LISTED = 20
BUILD_WAIT_S = 24 * 3600  # how long the other ranks of a node wait for local rank 0 to build the dataset


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
    """Fit the k-means patch tokenizer, the one kind tokenize fits itself (validate_settings refuses others)."""
    t = cfg.tokenizer
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
    log.info("fitting %s tokenizer (K=%d, D=%d, patch %d) on %d images", t.kind, t.codebook_size, t.codebook_dim,
             t.patch_size, len(images))
    tokenizer = PatchKMeansTokenizer.fit(images, patch_size=t.patch_size, codebook_size=t.codebook_size,
                                         codebook_dim=t.codebook_dim, max_patches=t.fit_patches, iters=t.fit_iters,
                                         seed=t.seed)
    if t.compact:
        counts = torch.bincount(tokenizer.encode(images).reshape(-1), minlength=tokenizer.codebook_size)
        tokenizer = tokenizer.compacted(counts)
        log.info("compaction: %d of %d codes used on the fit images", tokenizer.codebook_size, t.codebook_size)
    distinct = len(torch.unique(tokenizer.codebook, dim=0))
    if distinct < 2:  # checked before the tokenizer is saved: a rerun must not find and reuse it
        raise ValueError(f"the {t.kind} codebook fitted on {len(images)} images of data.build.source has {distinct} "
                         "distinct code: the images are flat (one colour); fit on varied images or pass tokenizer.checkpoint")
    return tokenizer


def obtain_tokenizer(cfg, train_records: list[ImageRecord]) -> tuple[Tokenizer, Path]:
    path = tokenizer_path(cfg)
    if path.is_file():
        tokenizer = load_tokenizer(path, what="tokenizer.checkpoint" if cfg.tokenizer.checkpoint else "tokenizer")
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
    if tokenizer.codebook_size < 2:
        raise ValueError(f"the tokenizer at {path} has a codebook of {tokenizer.codebook_size} code: ids would carry nothing")
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


# --- driver -----------------------------------------------------------------------------------
def codec_model(root: Path, encoder: ImageEncoder, records: list[ImageRecord], total: int, build, recorded: str | None) -> str:
    """Fit the codec model on the first records' ids and save it in root, unless a resumed run did; its sha256.

    ``total``: how many samples it will code, which sets how large a model pays for itself.
    ``recorded``: the sha256 the plan holds for it, if the interrupted run got that far.
    """
    path = root / MODEL_FILE
    if not path.is_file():
        sample = records[: build.codec_fit_samples]
        log.info("fitting the %s codec model on the ids of %d images", build.codec, len(sample))
        ids = encode_records(encoder, sample, build.skip_bad_images, build.workers)[0]
        model = CtxModel.fit(ids, encoder.tokenizer.codebook_size, total_samples=total)
        atomic_write_bytes(path, model.to_bytes())  # canonical: the same ids give the same file
    sha = sha256_file(path)
    if recorded and sha != recorded:
        raise DatasetError(f"{path} is not the codec model this run's plan recorded (sha256 {sha[:12]}…, not "
                           f"{recorded[:12]}…): it was replaced; move {root} away to start over")
    return sha


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


def prepare_token_dataset(cfg) -> None:
    """Before a run reads the token dataset at cfg.data.root: build it if it is missing and
    data.build.source is set (local rank 0 tokenizes, the other ranks of the node wait for its
    dataset.json), else check that the finished one holds the data the config names.

    Every pipeline that reads a token dataset calls this first, so the data module only reads.
    """
    info = Path(cfg.data.root) / INFO_FILE
    if info.is_file():
        check_built_as_configured(cfg)
        return
    if not cfg.data.build.source:
        return
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        tokenize(cfg, rank=0, world=1)  # one process per node: the training ranks are not tokenize's
        return
    deadline = time.monotonic() + BUILD_WAIT_S
    while not info.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {BUILD_WAIT_S}s for local rank 0 to build {info}")
        time.sleep(5)


def check_built_as_configured(cfg) -> None:
    """A finished dataset is trained on only if it holds the data the config names: from the tokenizer
    checkpoint it names, and, when data.build.source is set, from that source (else a changed source
    would train on the old images without a word). Other build settings (shards, chunks, a quicker
    tokenizer fit under debug=fast) do not change which images a run trains on, so they are not
    compared here; task=tokenize compares them all. Read-only: a dataset on a read-only disk trains."""
    checkpoint, source = cfg.get("tokenizer", {}).get("checkpoint"), cfg.data.build.source
    if not (checkpoint or source):
        return
    info = TokenDatasetInfo.open(cfg.data.root)
    if checkpoint:
        check_built_by(info, checkpoint, cfg.tokenizer.get("copy_margin"))
    if source:
        built = (info.meta.get("build") or {}).get("source")
        wanted = source_id(str(source))
        if built is not None and built != wanted:  # no build record (imported datasets): nothing to compare
            raise DatasetError(f"{cfg.data.root} is a finished token dataset built with other settings: "
                               f"data.build.source={wanted} (built with {built}); build these under another data.root")


def launch_file(root: Path) -> Path:
    """Rank 0's go-ahead (or failure) to the other ranks of its launch; beside the dataset dir, with its lock."""
    return root.parent / f".{root.name}.launch.json"


def tokenize(cfg, rank: int | None = None, world: int | None = None) -> dict:
    """Build (or finish building) the token dataset at cfg.data.root; returns its dataset.json (rank 0;
    the other ranks return {} once their shards are written). ``rank``/``world`` default to the
    launcher's (torchrun, srun)."""
    if rank is None or world is None:
        rank, world = rank_world()
    if rank:
        return _follow(cfg, rank, world)
    root = Path(cfg.data.root)
    with exclusive(root):
        if world > 1:
            for stale in [launch_file(root), *(root / PROGRESS_DIR).glob("rank-*.error")]:
                stale.unlink(missing_ok=True)  # an earlier launch's go-ahead or failures
        try:
            return _tokenize(cfg, world)
        except BaseException as exc:
            if world > 1:  # the other ranks stop at once, with the reason
                atomic_write_json(launch_file(root), {"launch": launch_id(), "error": str(exc)})
            raise


def _finished(cfg, root: Path) -> dict:
    info = TokenDatasetInfo.open(root)
    if cfg.tokenizer.get("checkpoint"):
        check_built_by(info, cfg.tokenizer.checkpoint, cfg.tokenizer.get("copy_margin"))
    if cfg.data.build.source:
        check_finished(root, info.meta, settings(cfg))
    shutil.rmtree(root / PROGRESS_DIR, ignore_errors=True)  # a run killed between its last two steps
    log.info("%s already complete (%d samples); nothing to do", root, info.meta["num_samples"])
    return info.meta


def _listing(cfg, quiet: bool = False) -> tuple[str, SourceListing]:
    source = os.path.abspath(resolve_source(str(cfg.data.build.source), cfg.paths.cache_dir))
    listing = list_source(source)
    shuffle(listing, cfg.data.build.shuffle_seed)
    if quiet:  # a rank > 0: rank 0 has said it
        return source, listing
    if listing.ignored:
        log.warning("%d file(s) in %s are not tokenized (not %s images, or beside the class folders), e.g. %s; "
                    "listed in dataset.json", len(listing.ignored), source, "/".join(sorted(IMAGE_EXTS)),
                    ", ".join(listing.ignored[:3]))
    _warn_labels(source, listing)
    return source, listing


def _warn_labels(source: str, listing: SourceListing) -> None:
    """Kept, but said and recorded (dataset.json ``unlabelled``, ``empty_classes``): an unlabelled split beside
    labelled ones (classification cannot use it), and classes without images in a labelled split."""
    unlabelled = listing.unlabelled()
    labelled = [s for s, recs in listing.splits.items() if unlabelled[s] < len(recs)]
    if not labelled:
        return  # an unlabelled source (pretraining): nothing is missing
    bare = [f"{s} ({n} of {len(listing.splits[s])} images)" for s, n in unlabelled.items() if n]
    if bare:
        log.warning("split(s) of %s without labels while %s has them: %s; classification cannot use them (recorded as "
                    "unlabelled in dataset.json)", source, "/".join(labelled), ", ".join(bare))
    empty = [f"{s}: {', '.join(names[:10])}{' …' if len(names) > 10 else ''}"
             for s, names in listing.empty_classes().items() if s in labelled and names]
    if empty:
        log.warning("class(es) of %s without images: %s; kept in the class list so labels stay stable (recorded as "
                    "empty_classes in dataset.json)", source, "; ".join(empty))


def _planned(root: Path) -> dict:
    path = root / PROGRESS_DIR / PLAN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _encoder(cfg, tokenizer: Tokenizer, planned: str | None) -> ImageEncoder:
    """The tokenizer on ``tokenizer.device`` (this node's GPU ``LOCAL_RANK`` under several ranks), in
    ``tokenizer.precision``; ids come back on the CPU."""
    device = encode_device(cfg.tokenizer.get("device"), local_rank())
    precision = encode_precision(cfg.tokenizer.get("precision"), tokenizer, device, planned)
    return ImageEncoder(tokenizer, torch.device("cpu"), device, precision)


def _tokenize(cfg, world: int = 1) -> dict:
    root = Path(cfg.data.root)
    build = cfg.data.build
    if (root / INFO_FILE).is_file():
        return _finished(cfg, root)
    if not build.source:
        raise ValueError(f"no token dataset at {root} and no data.build.source to build it from")
    validate_settings(cfg)
    check_planned(root)
    source, listing = _listing(cfg)
    splits = listing.splits
    first = splits.get("train") or next(iter(splits.values()))
    tokenizer, tok_path = obtain_tokenizer(cfg, first)
    synonyms_k = min(build.synonyms_k, tokenizer.codebook_size - 1)
    if synonyms_k < build.synonyms_k:
        log.warning("the codebook has %d codes: %d synonyms per code, not data.build.synonyms_k=%d",
                    tokenizer.codebook_size, synonyms_k, build.synonyms_k)
    encoder_precision = (_planned(root).get("tokenizer") or {}).get("precision")
    fingerprint, codebook = tokenizer.fingerprint, tokenizer.codebook.cpu()
    encoder = _encoder(cfg, tokenizer, encoder_precision)  # moves the tokenizer to its device
    plan = start_plan(root, {**settings(cfg, encoder.precision), "listing_sha256": listing_hash(splits),
                             "codebook_sha256": fingerprint})
    margin = float(getattr(tokenizer, "copy_margin", 0.0))
    progress = root / PROGRESS_DIR
    codec_fields = {}
    if build.codec in MODEL_CODECS:
        sha = codec_model(root, encoder, first, sum(map(len, splits.values())), build, plan.get("codec_model_sha256"))
        if "codec_model_sha256" not in plan:
            plan = {**plan, "codec_model_sha256": sha}
            atomic_write_json(progress / PLAN_FILE, plan)
        codec_fields = {"codec_model": MODEL_FILE}
    fingerprint = save_codebook(root / CODEBOOK_FILE, codebook)
    synonym_fields = {}
    if synonyms_k:
        save_synonyms(root / SYNONYMS_FILE, synonyms(codebook, synonyms_k))
        synonym_fields = {"synonyms_file": SYNONYMS_FILE, "synonyms_k": synonyms_k}

    jobs = shard_jobs(cfg, root, plan_shards(splits, build.shard_size))
    if world > 1:
        atomic_write_json(launch_file(root), {"launch": launch_id(), "world": world})
    done = run_shards(jobs, encoder, get_codec(build.codec, model_dir=root), build, 0, world)
    if world > 1:
        done = _gather(jobs, done, world, build.rank_stall_s)
    skipped = [s for r in done for s in r.pop("skipped_samples")]
    fields = dict(
        shards=done, grid=tokenizer.grid, codebook_size=tokenizer.codebook_size,
        codebook_dim=tokenizer.codebook_dim, codec=build.codec, chunk_size=build.chunk_size,
        codebook_sha256=fingerprint, classes=listing.classes, image_size=tokenizer.image_size,
        tokenizer={"kind": tokenizer.kind, "checkpoint": str(tok_path.resolve()), "device": encoder.encode_device.type,
                   **({"copy_margin": margin} if margin else {})},
        skipped={"count": len(skipped), "samples": skipped}, source=source,
        source_bytes=sum(_size(r) for recs in splits.values() for r in recs),
        ignored_files={"count": len(listing.ignored), "files": listing.ignored[:_IGNORED_LISTED]},
        unlabelled={split: sum(r["unlabelled"] for r in done if r["split"] == split) for split in splits},
        empty_classes=listing.empty_classes(),
        build=plan, **synonym_fields, **codec_fields)
    n = sum(r["count"] for r in done)
    if build.storage_report and n:  # measured on the shards, before dataset.json exists
        fields["storage"] = storage_report(TokenDatasetInfo(root, {**fields, "num_samples": n}),
                                           fields["source_bytes"] / n, max_samples=build.storage_report_samples)
        print(format_report(fields["storage"]), flush=True)
    meta = write_dataset_info(root, **fields)
    shutil.rmtree(progress)
    print_summary(meta)
    return meta


def _gather(jobs: list[dict], own: list[dict], world: int, stall_s: float) -> list[dict]:
    """Every shard's record in plan order, once the other ranks have written theirs.

    Raises (one line) when a rank reports its failure, or when no shard has finished for ``stall_s``
    seconds (``data.build.rank_stall_s``: a rank died or hangs); the finished shards stay, so the same
    command resumes with any number of ranks.
    """
    progress = Path(jobs[0]["progress"]).parent if jobs else None
    missing = [j for j in jobs if not Path(j["progress"]).is_file()]
    deadline, left = time.monotonic() + stall_s, len(missing)
    while missing:
        for error in sorted(progress.glob("rank-*.error")):
            raise RuntimeError(f"tokenize {error.stem} failed: {json.loads(error.read_text())['error']}; "
                               "rerun the same command to resume (finished shards are kept)")
        if len(missing) < left:
            deadline, left = time.monotonic() + stall_s, len(missing)
        if time.monotonic() > deadline:
            ranks = sorted({jobs.index(j) % world for j in missing})
            raise TimeoutError(f"no shard finished in {stall_s:.0f}s (data.build.rank_stall_s) and {len(missing)} of "
                               f"{len(jobs)} are missing ({Path(missing[0]['path']).name}, …) from rank(s) {ranks}: a "
                               "rank died or hangs; rerun the same command to resume (finished shards are kept)")
        time.sleep(1.0)
        missing = [j for j in missing if not Path(j["progress"]).is_file()]
    mine = {r["name"]: r for r in own}
    return [mine.get(Path(j["path"]).name) or json.loads(Path(j["progress"]).read_text()) for j in jobs]


def _follow(cfg, rank: int, world: int) -> dict:
    """A rank > 0: once its rank 0 has planned the build, encode and write the shards ``i % world == rank``."""
    root = Path(cfg.data.root)
    if (root / INFO_FILE).is_file():
        return {}
    validate_settings(cfg)
    progress, launch = root / PROGRESS_DIR, launch_id()

    def go() -> dict | None:
        try:
            state = json.loads(launch_file(root).read_text())
        except (OSError, ValueError):
            return None
        return state if state.get("launch") == launch else None

    wait_for(lambda: (root / INFO_FILE).is_file() or go() is not None, f"rank 0 to plan {root}", BUILD_WAIT_S)
    state = go()
    if state is None:  # finished by rank 0 alone: nothing left for this rank
        return {}
    if state.get("error"):
        raise RuntimeError(f"rank 0 failed: {state['error']}")
    try:
        return _follow_planned(cfg, root, rank, world, _planned(root))
    except BaseException as exc:
        atomic_write_json(progress / f"rank-{rank}.error", {"error": str(exc)})
        raise


def _follow_planned(cfg, root: Path, rank: int, world: int, plan: dict) -> dict:
    build = cfg.data.build
    _, listing = _listing(cfg, quiet=True)
    if listing_hash(listing.splits) != plan["listing_sha256"]:
        raise DatasetError(f"rank {rank} lists other images in data.build.source={build.source} than rank 0 did "
                           "(a source that differs between nodes, or changed during the run)")
    first = listing.splits.get("train") or next(iter(listing.splits.values()))
    tokenizer, _ = obtain_tokenizer(cfg, first)
    if tokenizer.fingerprint != plan["codebook_sha256"]:
        raise DatasetError(f"rank {rank} loaded a tokenizer with another codebook than rank 0's plan records")
    encoder = _encoder(cfg, tokenizer, plan["tokenizer"]["precision"])
    diff = differences(plan, settings(cfg, encoder.precision))
    if diff:
        raise DatasetError(f"rank {rank} was started with other settings than rank 0: {'; '.join(diff)}")
    jobs = shard_jobs(cfg, root, plan_shards(listing.splits, build.shard_size))
    done = run_shards(jobs, encoder, get_codec(build.codec, model_dir=root), build, rank, world)
    log.info("rank %d of %d: %d shards written or verified; rank 0 writes %s", rank, world, len(done), INFO_FILE)
    return {}


def _size(record: ImageRecord) -> int:
    """Its bytes in the source; an image that is gone (skipped as unreadable) has none."""
    if record.offset >= 0:
        return record.size
    try:
        return os.path.getsize(record.path)
    except OSError:
        return 0


def print_summary(meta: dict) -> None:
    line = (f"token dataset: {meta['num_samples']} samples, grid {meta['grid'][0]}x{meta['grid'][1]}, "
            f"K={meta['codebook_size']}, {meta['bytes_on_disk']:,} bytes on disk = "
            f"{meta['bytes_per_sample']:.1f} B/sample")
    if "percent_of_source" in meta:
        line += f" = {meta['percent_of_source']:.2f}% of the {meta['source_bytes']:,} source bytes"
    if meta["skipped"]["count"]:
        line += f"; skipped {meta['skipped']['count']} unreadable images (listed in dataset.json)"
    print(line, flush=True)
