"""``task=convert``: SeiT's released token files <-> our token dataset directory.

``task.direction=import`` turns a SeiT token set (``task.seit_dir``) into a dataset at
``data.root``, so that the paper's released ImageNet tokens can be trained on here; ``export``
writes a dataset back in SeiT's layout. Sample order is kept both ways (imported keys are
``{split}/{index:08d}`` and export orders by key), so export(import(x)) gives back x's ids and
labels exactly, and SeiT's synonyms json byte for byte (a verbatim copy travels in the dataset).

The codebook is stored in float16 here as every codebook of this project is (see
``save_codebook``); import warns when that rounds the SeiT codebook's values.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from seit.data.codec import MODEL_CODECS, get_codec
from seit.data.codec_ctx import MODEL_FILE, CtxModel
from seit.data.dataset_info import (CODEBOOK_FILE, SHARD_DIR, SYNONYMS_FILE, DatasetError, TokenDatasetInfo,
                                    save_codebook, save_synonyms, write_dataset_info)
from seit.data.seit_format import (CODEBOOK_CKPT, MAX_FILE_ID, SYNONYMS_FILES, find_synonyms, load_synonyms_json,
                                   read_seit_codebook, read_seit_split, read_synonyms, seit_split_paths,
                                   write_seit_codebook, write_seit_split, write_synonyms)
from seit.data.shard_reader import read_split
from seit.data.shard_writer import write_shard
from seit.tokenizers.codebook_tools import synonyms as nearest_codes
from seit.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)
SEIT_SYNONYMS = "seit-synonyms.json"  # the verbatim SeiT synonyms json inside an imported dataset


def convert(cfg) -> dict:
    direction = cfg.task.direction
    if direction == "import":
        return import_seit(cfg)
    if direction == "export":
        return export_seit(cfg)
    raise ValueError(f"task.direction must be 'import' or 'export', got {direction!r}")


def import_seit(cfg) -> dict:
    """SeiT files in task.seit_dir -> a new token dataset at data.root; returns its dataset.json.

    Every SeiT file is read and checked before the first byte is written, so a malformed split
    leaves no half-built dataset behind.
    """
    src, root, build, prefix = Path(cfg.task.seit_dir), Path(cfg.data.root), cfg.data.build, cfg.task.prefix
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"data.root={root} is not empty; import writes a new dataset there, so remove it "
                              "or pick another data.root")
    grid = tuple(int(g) for g in cfg.task.grid)
    codebook = read_seit_codebook(src)
    k = codebook.shape[0]
    synonyms_path, synonyms = find_synonyms(src), read_synonyms(src, codebook_size=k)
    splits = {split: read_seit_split(src, prefix, split, grid, codebook_size=k) for split in cfg.task.splits}
    read = [src / CODEBOOK_CKPT, *([synonyms_path] if synonyms_path else []),
            *(p for split in splits for p in seit_split_paths(src, prefix, split))]

    (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    fingerprint = save_codebook(root / CODEBOOK_FILE, codebook)
    rounding = (codebook.float() - codebook.to(torch.float16).float()).abs().max().item()
    if rounding:
        log.warning("%s: codebook values rounded to float16 (max abs change %.3g)", src / CODEBOOK_CKPT, rounding)
    codec_fields = {}
    if build.codec in MODEL_CODECS:  # fitted on every imported id: they are all in memory already
        CtxModel.fit(np.concatenate([ids for ids, _ in splits.values()]), k).save(root / MODEL_FILE)
        codec_fields = {"codec_model": MODEL_FILE}
    codec = get_codec(build.codec, model_dir=root)
    records = []
    for split, (ids, labels) in splits.items():
        keys = [f"{split}/{i:08d}" for i in range(len(ids))]
        for s, start in enumerate(range(0, len(ids), build.shard_size)):
            end = start + build.shard_size
            records.append(write_shard(root / SHARD_DIR / f"{split}-{s:06d}.tar", ids[start:end], labels[start:end],
                                       keys[start:end], split=split, codec=codec, codebook_size=k,
                                       chunk_size=build.chunk_size).to_dict())
    extra = {}
    if build.synonyms_k:
        table, origin = synonym_table(synonyms, codebook, build.synonyms_k, synonyms_path)
        save_synonyms(root / SYNONYMS_FILE, table)
        extra = {"synonyms_file": SYNONYMS_FILE, "synonyms_k": build.synonyms_k, "synonyms_from": origin}
    if synonyms_path:
        atomic_write_bytes(root / SEIT_SYNONYMS, synonyms_path.read_bytes())
    max_label = max((int(labels.max(initial=-1)) for _, labels in splits.values()), default=-1)
    meta = write_dataset_info(
        root, shards=records, grid=grid, codebook_size=k, codebook_dim=int(codebook.shape[1]), codec=build.codec,
        chunk_size=build.chunk_size, codebook_sha256=fingerprint, classes=[str(i) for i in range(max_label + 1)],
        source_bytes=sum(os.path.getsize(p) for p in read), **extra, **codec_fields,
        imported_from={"format": "seit", "dir": str(src.resolve()), "prefix": prefix, "splits": list(splits),
                       "synonyms": {"file": SEIT_SYNONYMS, "name": synonyms_path.name} if synonyms_path else None})
    n = max(meta["num_samples"], 1)
    print(f"imported {meta['num_samples']} samples from {src}: {meta['bytes_on_disk']:,} bytes on disk = "
          f"{meta['bytes_on_disk'] / n:.1f} B/sample (the SeiT files: {meta['source_bytes']:,} bytes = "
          f"{meta['source_bytes'] / n:.1f} B/sample)", flush=True)
    return meta


def synonym_table(seit: dict | None, codebook: torch.Tensor, k: int, path: Path | None) -> tuple[torch.Tensor, str]:
    """The [K, k] synonym table Token-EDA samples from, and where it came from.

    SeiT's own synonyms when they name k other codes for every code (their lists may start with
    the code itself, which is dropped), else each code's k nearest codes, as tokenize makes them.
    """
    if seit is not None:
        rows = [[s for s in seit.get(str(t), []) if s != t][:k] for t in range(codebook.shape[0])]
        if all(len(row) == k for row in rows):
            return torch.tensor(rows), "seit"
        log.warning("%s does not name %d other codes for every code; synonyms_k=%d synonyms come from the codebook",
                    path, k, k)
    return nearest_codes(codebook, k), "codebook"


def export_seit(cfg) -> dict:
    """The token dataset at data.root -> SeiT files in task.seit_dir (every split); returns a summary.

    The dataset may be the only copy of the data and task.seit_dir may hold another SeiT set, so
    export never overwrites: it refuses a seit_dir holding any file it would write, and builds every
    file in a hidden temp dir inside seit_dir, moved into place only once every split was read and
    written. A damaged shard thus fails the export with nothing new left in seit_dir.
    """
    info = TokenDatasetInfo.open(cfg.data.root)
    if info.codebook_size > MAX_FILE_ID + 1:
        raise DatasetError(f"{info.root}: a codebook of K={info.codebook_size} has ids beyond {MAX_FILE_ID}, which "
                           "SeiT's loader cannot read back (it takes one escape byte per id); export needs K <= "
                           f"{MAX_FILE_ID + 1}")
    out, prefix = Path(cfg.task.seit_dir), cfg.task.prefix
    synonyms = synonyms_name(info)
    names = [CODEBOOK_CKPT, *([synonyms] if synonyms else []),
             *(p.name for split in info.meta["splits"] for p in seit_split_paths(out, prefix, split))]
    taken = [name for name in names if os.path.lexists(out / name)]
    if taken:
        raise FileExistsError(f"task.seit_dir={out} already holds {', '.join(taken)}: export never overwrites "
                              "files; pick another task.seit_dir or move them away")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        write_seit_codebook(tmp, info.load_codebook())
        if synonyms:
            export_synonyms(info, tmp / synonyms)
        for split in info.meta["splits"]:
            write_seit_split(tmp, prefix, split, *read_split(info, split, by_key=True)[:2])
        for name in names:
            os.replace(tmp / name, out / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    tmp.rmdir()
    written = [out / name for name in names]
    n = info.meta["num_samples"]
    total = sum(os.path.getsize(p) for p in written)
    print(f"exported {n} samples of {info.root} to {out}: {total:,} bytes of SeiT files = {total / max(n, 1):.1f} "
          f"B/sample (the token dataset: {info.meta['bytes_on_disk']:,} bytes)", flush=True)
    return {"num_samples": n, "files": [str(p) for p in written], "bytes": total}


def synonyms_name(info: TokenDatasetInfo) -> str | None:
    """The synonyms file export writes: an imported SeiT json's own name, else SeiT's name for the
    dataset's table, else none."""
    seit = (info.meta.get("imported_from") or {}).get("synonyms")
    if seit:
        return seit["name"]
    return SYNONYMS_FILES[0] if info.meta.get("synonyms_file") else None


def export_synonyms(info: TokenDatasetInfo, path: Path) -> None:
    """An imported SeiT json goes back verbatim; else the dataset's table."""
    seit = (info.meta.get("imported_from") or {}).get("synonyms")
    if seit:
        source = info.root / seit["file"]
        load_synonyms_json(source, info.codebook_size)  # checked before it is passed on
        atomic_write_bytes(path, source.read_bytes())
    else:
        write_synonyms(path.parent, {str(t): row for t, row in enumerate(info.load_synonyms().tolist())}, path.name)

