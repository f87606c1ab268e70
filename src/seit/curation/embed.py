"""Embeddings of a token dataset split: what every curation method reads.

    OUT/embeddings.npy   float16 [N, D], L2-normalised rows, in the dataset's sample order (memmap)
    OUT/keys.txt         the N sample keys, one per line, same order
    OUT/embeddings.json  split id, checkpoint, dim, count; written last: its presence means complete
    OUT/.progress/       one record per finished shard, so an interrupted run resumes shard by shard

Any checkpoint of ours embeds: a classifier ``.ckpt`` (pooled pre-logits features), an MTM
``.ckpt`` or ``mtm.safetensors`` export (the encoder's mean patch output, nothing masked), a DINO
``.ckpt`` or ``dino.safetensors`` (the class token). Inputs
are the evaluation view (the model's centre crop). ``features=thumbnail`` needs no model: the
codebook map average-pooled to a g x g grid, a copy-detection descriptor (DINOv2 dedups with a
copy detector, not with its semantic embedding). ``whiten=d`` PCA-whitens to d dims (fitted on a
sample, float64), which spreads the crowded directions apart so a cosine threshold means the same
everywhere. Shards are split over ranks (``i % world``);
each rank writes its shards' rows straight into the shared memmap at their dataset offsets, then
rank 0 joins the keys once every shard is recorded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from seit.augment.crop import center_crop
from seit.data.dataset_info import DatasetError, TokenDatasetInfo, split_id
from seit.data.shard_reader import read_shard
from seit.tasks.checkpoint import load_model
from seit.utils.io import atomic_open, atomic_write_json, sha256_file
from seit.utils.ranks import all_exist, rank_world, wait_for

log = logging.getLogger(__name__)
EMBEDDINGS, KEYS, META, PROGRESS = "embeddings.npy", "keys.txt", "embeddings.json", ".progress"


class Embedder(nn.Module):
    """ids uint16 [B, H, W] -> L2-normalised features float32 [B, D]."""

    def __init__(self, features, crop: int | None, dim: int, kind: str, fingerprint: str | None, net: nn.Module):
        super().__init__()
        self.net, self._features = net, features
        self.crop, self.dim, self.kind, self.fingerprint = crop, dim, kind, fingerprint

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        if self.crop and self.crop < ids.shape[-1]:
            ids = center_crop(ids[:, None], self.crop)[:, 0]
        return F.normalize(self._features(ids).float(), dim=-1)


def thumbnail_embedder(codebook: torch.Tensor, grid: int) -> Embedder:
    """The codebook map average-pooled to grid x grid: [B, D * grid^2]."""
    table = nn.Embedding.from_pretrained(codebook.float())
    features = lambda ids: F.adaptive_avg_pool2d(table(ids).permute(0, 3, 1, 2), grid).flatten(1)  # noqa: E731
    return Embedder(features, None, codebook.shape[1] * grid * grid, "thumbnail", None, table)


def load_embedder(path: str | Path, fingerprint: str | None = None) -> Embedder:
    """The feature extractor of a checkpoint of ours (``seit.tasks.checkpoint``); refuse a pixel model,
    or one trained on another codebook."""
    model = load_model(path)
    if model.input != "tokens":
        raise ValueError(f"task.checkpoint={path} is a pixel classifier; embedding a token dataset needs a token model")
    model.check_codebook(fingerprint, "the dataset")
    return Embedder(model.features, None, model.dim, model.kind, model.fingerprint, model.net).eval()


# -- the embedding store -----------------------------------------------------------------------
@dataclass
class Embeddings:
    root: Path
    meta: dict
    vectors: np.ndarray  # float16 [N, D] memmap
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def check_against(self, info: TokenDatasetInfo, split: str) -> None:
        """Refuse embeddings made from another dataset, another split, or with another count."""
        expected = info.num_samples(split)
        if len(self) != expected:
            raise DatasetError(f"{self.root} holds {len(self)} embeddings, but split {split!r} of {info.root} has "
                               f"{expected} samples: re-run task=embed for this dataset")
        if self.meta["split_id"] != split_id(info, split):
            raise DatasetError(f"{self.root} was embedded from another dataset or split ({self.meta['dataset']} "
                               f"split {self.meta['split']!r}), not split {split!r} of {info.root}")

    def chunks(self, size: int = 1 << 16):
        """(start, float32 block) over the rows: streaming, never the whole matrix in memory."""
        for start in range(0, len(self), size):
            yield start, np.asarray(self.vectors[start:start + size], dtype=np.float32)


def open_embeddings(root: str | Path) -> Embeddings:
    root = Path(root)
    meta_path = root / META
    if not meta_path.is_file():
        raise DatasetError(f"{meta_path} not found: {root} holds no finished embeddings (run task=embed; "
                           "an interrupted one resumes when re-run)")
    meta = json.loads(meta_path.read_text())
    vectors = np.load(root / EMBEDDINGS, mmap_mode="r")
    keys = (root / KEYS).read_text().splitlines()
    if vectors.shape != (meta["num_samples"], meta["dim"]) or len(keys) != meta["num_samples"]:
        raise DatasetError(f"{root}: {vectors.shape[0]} vectors of dim {vectors.shape[1]} and {len(keys)} keys, but "
                           f"{META} says {meta['num_samples']} x {meta['dim']}: the store is damaged, re-run task=embed")
    return Embeddings(root, meta, vectors, keys)


@torch.no_grad()
def embed_split(info: TokenDatasetInfo, split: str, checkpoint: str | Path | None, out: str | Path, *,
                batch_size: int = 512, device: str = "auto", features: str = "checkpoint", thumbnail_grid: int = 8,
                whiten: int = 0, whiten_sample: int = 100_000) -> Embeddings:
    out = Path(out)
    rank, world = rank_world()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if features == "thumbnail":
        embedder = thumbnail_embedder(info.load_codebook(), thumbnail_grid).to(dev)
    elif features == "checkpoint":
        if not checkpoint:
            raise ValueError("task=embed needs task.checkpoint=PATH (or task.features=thumbnail)")
        embedder = load_embedder(checkpoint, info.fingerprint).to(dev)
    else:
        raise ValueError(f"task.features must be checkpoint or thumbnail, got {features!r}")
    if whiten < 0 or whiten > embedder.dim:
        raise ValueError(f"task.whiten={whiten} must be in [0, {embedder.dim}] (0 = off)")
    shards = info.shards(split)
    offsets = np.concatenate([[0], np.cumsum([s["count"] for s in shards])]).tolist()
    plan = {"dataset": str(info.root), "split": split, "split_id": split_id(info, split), "num_samples": offsets[-1],
            "dim": whiten or embedder.dim, "dtype": "float16", "model_kind": embedder.kind,
            "checkpoint": str(checkpoint) if embedder.kind != "thumbnail" else None,
            "checkpoint_sha256": sha256_file(checkpoint) if embedder.kind != "thumbnail" else f"thumbnail{thumbnail_grid}",
            "whiten": whiten}
    if (out / META).is_file():
        done = json.loads((out / META).read_text())
        _check_plan(out, done, plan)
        return open_embeddings(out)
    progress = out / PROGRESS
    if rank == 0:
        _start(out, plan, embedder.dim)
    wait_for(all_exist([progress / "plan.json"]), f"rank 0 to create {out / EMBEDDINGS}")
    _check_plan(out, json.loads((progress / "plan.json").read_text()), plan)
    raw_path = out / EMBEDDINGS if not whiten else progress / "raw.npy"
    vectors = np.load(raw_path, mmap_mode="r+")
    codec, specs = info.load_codec(), info.shard_specs(split)
    mine = [i for i in range(len(shards)) if i % world == rank and not (progress / f"{shards[i]['name']}.json").is_file()]
    bar = tqdm(total=sum(shards[i]["count"] for i in mine), desc=f"embed (rank {rank})", unit="sample", disable=None)
    for i in mine:
        keys, row = [], offsets[i]
        for chunk in read_shard(specs[i], codec):
            for start in range(0, len(chunk), batch_size):
                ids = torch.from_numpy(chunk.ids[start:start + batch_size].astype(np.int64)).to(dev)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    feats = embedder(ids)
                vectors[row:row + len(ids)] = feats.cpu().numpy().astype(np.float16)
                row += len(ids)
                bar.update(len(ids))
            keys += chunk.keys
        if row != offsets[i + 1]:
            raise DatasetError(f"{specs[i].path} holds {row - offsets[i]} samples, dataset.json says {shards[i]['count']}")
        vectors.flush()
        atomic_write_json(progress / f"{shards[i]['name']}.json", {"keys": keys})
    bar.close()
    if rank == 0:
        records = [progress / f"{s['name']}.json" for s in shards]
        wait_for(all_exist(records), "every rank's shards to be embedded")
        if whiten:
            _whiten(vectors, out, whiten, whiten_sample)
        with atomic_open(out / KEYS) as f:
            for record in records:
                f.write("".join(k + "\n" for k in json.loads(record.read_text())["keys"]).encode())
        atomic_write_json(out / META, plan)
    else:
        wait_for(all_exist([out / META]), f"rank 0 to finish {out / META}")
    log.info("embedded %d samples of %s split %s into %s", plan["num_samples"], info.root, split, out)
    return open_embeddings(out)


def _zeros(path: Path, rows: int, dim: int) -> None:
    """A zero-filled float16 .npy of [rows, dim], atomically, without touching its pages."""
    with atomic_open(path) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": (rows, dim)})
        f.truncate(f.tell() + 2 * rows * dim)


def _start(out: Path, plan: dict, raw_dim: int) -> None:
    progress = out / PROGRESS
    progress.mkdir(parents=True, exist_ok=True)
    if not (progress / "plan.json").is_file():
        _zeros(out / EMBEDDINGS if not plan["whiten"] else progress / "raw.npy", plan["num_samples"], raw_dim)
        atomic_write_json(progress / "plan.json", plan)


def _whiten(raw: np.ndarray, out: Path, dims: int, sample: int, chunk: int = 1 << 16) -> None:
    """PCA-whiten the raw rows to ``dims``, re-normalise, write embeddings.npy; keep the transform."""
    from seit.curation.kmeans import sample_indices

    x = np.asarray(raw[sample_indices(len(raw), sample, 0)], np.float64)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    proj = (vt[:dims].T / np.maximum(s[:dims], 1e-12) * np.sqrt(len(x))).astype(np.float32)
    np.savez(out / "whitening.npz", mean=mean.astype(np.float32), projection=proj)
    _zeros(out / EMBEDDINGS, len(raw), dims)
    dst = np.load(out / EMBEDDINGS, mmap_mode="r+")
    for start in range(0, len(raw), chunk):
        y = (np.asarray(raw[start:start + chunk], np.float32) - mean.astype(np.float32)) @ proj
        dst[start:start + len(y)] = (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float16)
    dst.flush()


def _check_plan(out: Path, found: dict, plan: dict) -> None:
    diff = [k for k in ("split_id", "dim", "checkpoint_sha256") if found.get(k) != plan[k]]
    if diff:
        raise DatasetError(f"{out} holds embeddings of another run (differs in {diff}: {found.get('checkpoint')} on "
                           f"{found.get('dataset')}); pick another task.out_dir or delete it")
