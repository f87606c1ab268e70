"""The self-describing token dataset directory.

    DIR/dataset.json          what is in it (see REQUIRED_FIELDS), written last and atomically
    DIR/codebook.safetensors  the K x D codebook the ids index into
    DIR/synonyms.safetensors  each code's nearest codes, for Token-EDA (optional)
    DIR/shards/*.tar          chunked token shards

A reader trusts nothing it has not checked: missing files, fields and fingerprint mismatches
raise ``DatasetError`` naming the directory and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from seit.data.codec import Codec, get_codec
from seit.utils.io import atomic_save_tensors, atomic_write_bytes, json_bytes, sha256_file

FORMAT_NAME = "seit-tokens"
FORMAT_VERSION = 1
INFO_FILE = "dataset.json"
CODEBOOK_FILE = "codebook.safetensors"
SYNONYMS_FILE = "synonyms.safetensors"
SHARD_DIR = "shards"
REQUIRED_FIELDS = ("format", "version", "num_samples", "grid", "codebook_size", "codec", "codebook_sha256",
                   "classes", "shards", "bytes_on_disk", "source_bytes", "chunk_size")


# Keys renamed since they were first written to disk (old name -> new name): dataset.json, the
# tokenize plan's "tokenizer" settings (also dataset.json's "build"), saved tokenizer configs.
# ``embed_dim`` was the codebook's width D; embed_dim now means only the ViT's width.
RENAMED_KEYS = {"embed_dim": "codebook_dim"}


def upgraded(d: dict) -> dict:
    """``d`` with each old key (``RENAMED_KEYS``) under its new name; a new key already there wins."""
    if not any(old in d for old in RENAMED_KEYS):
        return d
    return {RENAMED_KEYS.get(k, k): v for k, v in d.items() if RENAMED_KEYS.get(k) not in d}


def upgraded_meta(meta: dict) -> dict:
    """A dataset.json's fields under their current names: its own and its build plan's tokenizer settings."""
    out = upgraded(meta)
    build = out.get("build")
    if isinstance(build, dict) and isinstance(build.get("tokenizer"), dict):
        out = {**out, "build": {**build, "tokenizer": upgraded(build["tokenizer"])}}
    return out


class DatasetError(ValueError):
    """A token dataset that is missing, incomplete or does not match what the caller expects."""


@dataclass(frozen=True)
class ShardSpec:
    """What dataset.json promises about one shard; ``shard_reader`` checks all of it on every read."""

    path: str
    split: str
    count: int  # samples
    chunk_size: int  # samples per chunk; the last chunk holds the rest
    grid: tuple[int, int]
    codebook_size: int
    num_classes: int  # labels are -1 (unlabelled) or in [0, num_classes)
    sha256: str | None = None
    bytes: int | None = None

    @property
    def num_chunks(self) -> int:
        return -(-self.count // self.chunk_size)

    def chunk_count(self, index: int) -> int:
        """Samples in chunk ``index``."""
        return min(self.chunk_size, self.count - index * self.chunk_size)


def codebook_fingerprint(codebook: torch.Tensor) -> str:
    """sha256 over the shape and the float16 values of the codebook.

    Codebooks are stored in float16 (a token embedding needs no more, and on a small dataset
    the codebook is a visible share of the bytes), so the fingerprint is taken at that precision.
    """
    arr = codebook.detach().cpu().to(torch.float16).contiguous().numpy().astype("<f2", copy=False)
    h = hashlib.sha256(f"{arr.shape[0]}x{arr.shape[1]}:".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def save_codebook(path: str | os.PathLike, codebook: torch.Tensor) -> str:
    codebook = codebook.detach().cpu().to(torch.float16).contiguous()
    fingerprint = codebook_fingerprint(codebook)
    atomic_save_tensors(path, {"codebook": codebook}, metadata={"sha256": fingerprint})
    return fingerprint


def save_synonyms(path: str | os.PathLike, table: torch.Tensor) -> None:
    """Store a [K, k] synonym table (nearest first) as uint16."""
    atomic_save_tensors(path, {"synonyms": table.to(torch.int32).to(torch.uint16).contiguous()})


def dir_bytes(root: str | os.PathLike) -> int:
    """Every byte of every file under root, as the dataset costs on disk.

    Hidden entries (in-flight temp files, the ``.progress`` dir of a running tokenize) are not
    part of the finished dataset and are left out.
    """
    total = 0
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files if not f.startswith("."))
    return total


# What a reader relies on: sealed by ``meta_sha256``, so that a hand-edited or damaged dataset.json
# (a shard entry swapped in from another dataset, edited counts or checksums) is refused.
SEALED_FIELDS = ("num_samples", "splits", "grid", "codebook_size", "codec", "chunk_size", "codebook_sha256", "classes",
                 "shards", "file_sha256")


def seal(meta: dict) -> str:
    """sha256 of the sealed fields of a dataset.json (``meta_sha256``)."""
    body = {k: meta.get(k) for k in SEALED_FIELDS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_checksums(root: Path) -> dict[str, str]:
    """sha256 of every file of the dataset dir beside dataset.json (codebook, codec model, synonyms):
    the codebook has its fingerprint and the codec model its own check, but a damaged synonym table
    would otherwise feed Token-EDA wrong synonyms without a word."""
    return {p.name: sha256_file(p) for p in sorted(root.iterdir())
            if p.is_file() and p.name != INFO_FILE and not p.name.startswith(".")}


def write_dataset_info(root: str | os.PathLike, *, shards: list[dict], grid: tuple[int, int], codebook_size: int,
                       codebook_dim: int, codec: str, chunk_size: int, codebook_sha256: str, classes: list[str],
                       source_bytes: int, **extra) -> dict:
    """Write dataset.json last and once (atomically), when every shard and the codebook are in place.

    ``bytes_on_disk`` counts every file of the dataset dir, dataset.json included, so its text is
    re-made in memory until its own size matches the total it states; only then is it written.
    """
    root = Path(root)
    splits: dict[str, int] = {}
    for s in shards:
        splits[s["split"]] = splits.get(s["split"], 0) + s["count"]
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "num_samples": sum(splits.values()), "splits": splits,
            "grid": list(grid), "codebook_size": codebook_size, "codebook_dim": codebook_dim, "codec": codec,
            "chunk_size": chunk_size, "codebook_sha256": codebook_sha256, "codebook_file": CODEBOOK_FILE,
            "classes": list(classes), **extra, "shards": shards, "file_sha256": file_checksums(root),
            "source_bytes": source_bytes, "bytes_on_disk": 0}
    meta["meta_sha256"] = seal(meta)
    old = root / INFO_FILE
    others = dir_bytes(root) - (old.stat().st_size if old.is_file() else 0)
    while True:
        data = json_bytes(meta)
        pad = meta["bytes_on_disk"] - others - len(data)
        if 0 <= pad <= 8:  # trailing spaces settle a total whose digits flip the length back and forth
            data = data[:-1] + b" " * pad + b"\n"
            break
        meta["bytes_on_disk"] = others + len(data)
        meta.update(storage_summary(meta))
    atomic_write_bytes(old, data)
    return meta


@dataclass
class TokenDatasetInfo:
    root: Path
    meta: dict

    @classmethod
    def open(cls, root: str | os.PathLike, check: bool = True) -> "TokenDatasetInfo":
        """Read and check dataset.json; ``check=False`` skips its seal and ``check_listing`` (a scrub reports them)."""
        root = Path(root)
        info_path = root / INFO_FILE
        if not info_path.is_file():
            if (root / ".progress" / "plan.json").is_file():
                raise DatasetError(f"{info_path} not found: {root} holds an interrupted tokenize; re-run it with the "
                                   "same settings to finish it")
            if (root / SHARD_DIR).is_dir() and any((root / SHARD_DIR).iterdir()):
                raise DatasetError(f"{info_path} not found, but {root / SHARD_DIR} holds shards: the dataset lost its "
                                   "dataset.json; restore it from a backup (its shards cannot be trusted without it)")
            hint = " (the directory does not exist)" if not root.exists() else ""
            raise DatasetError(f"{info_path} not found{hint}: not a token dataset; build one with "
                               f"`python run.py task=tokenize data.build.source=IMAGES data.root={root}`")
        try:
            meta = json.loads(info_path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{info_path} is not valid JSON: {exc}") from exc
        missing = [f for f in REQUIRED_FIELDS if f not in meta]
        if missing:
            raise DatasetError(f"{info_path} lacks required fields {missing}")
        if meta["format"] != FORMAT_NAME or meta["version"] > FORMAT_VERSION:
            raise DatasetError(f"{info_path}: format {meta['format']!r} v{meta['version']} is not readable "
                               f"by this version (reads {FORMAT_NAME!r} up to v{FORMAT_VERSION})")
        if check and "meta_sha256" in meta and seal(meta) != meta["meta_sha256"]:
            raise DatasetError(f"{info_path} does not match its own checksum (meta_sha256): it was edited or damaged "
                               "after it was written; restore it from a backup (shards, counts and checksums listed "
                               "in it can no longer be trusted)")
        if check:
            check_listing(root, meta)
        return cls(root=root, meta=meta)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    @property
    def codebook_dim(self) -> int:
        """The codebook's width D: ``codebook_dim``, or ``embed_dim`` in a dataset.json written before the rename."""
        return int(upgraded(self.meta).get("codebook_dim", 32))

    @property
    def codec(self) -> str:
        return self.meta["codec"]

    def load_codec(self) -> Codec:
        """The dataset's codec, with its model (if it has one) loaded from the dataset dir."""
        return get_codec(self.codec, model_dir=self.root)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def fingerprint(self) -> str:
        return self.meta["codebook_sha256"]

    def shards(self, split: str) -> list[dict]:
        shards = [s for s in self.meta["shards"] if s["split"] == split]
        if not shards:
            splits = sorted({s["split"] for s in self.meta["shards"]})
            raise DatasetError(f"{self.root} has no split {split!r}; it has {splits}")
        return shards

    def shard_specs(self, split: str) -> list[ShardSpec]:
        """One ShardSpec per shard of the split, in dataset order: what the reader checks."""
        return [self.spec(s) for s in self.shards(split)]

    def spec(self, shard: dict) -> ShardSpec:
        """The ShardSpec of one entry of dataset.json's ``shards``."""
        return ShardSpec(path=str(self.root / SHARD_DIR / shard["name"]), split=shard["split"], count=int(shard["count"]),
                         chunk_size=int(self.meta["chunk_size"]), grid=self.grid, codebook_size=self.codebook_size,
                         num_classes=len(self.classes), sha256=shard.get("sha256"), bytes=shard.get("bytes"))

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.root / SHARD_DIR / s["name"]) for s in self.shards(split)]

    def num_samples(self, split: str) -> int:
        return sum(s["count"] for s in self.shards(split))

    def load_codebook(self) -> torch.Tensor:
        path = self.root / CODEBOOK_FILE
        if not path.is_file():
            raise DatasetError(f"{path} not found")
        codebook = self._tensor(path, "codebook").to(torch.float32)
        actual = codebook_fingerprint(codebook)
        if actual != self.fingerprint:
            raise DatasetError(f"{path} has fingerprint {actual[:12]}…, but {INFO_FILE} says "
                               f"{self.fingerprint[:12]}…: the codebook was replaced or corrupted")
        if codebook.shape[0] != self.codebook_size:
            raise DatasetError(f"{path} has {codebook.shape[0]} entries, {INFO_FILE} says {self.codebook_size}")
        return codebook

    def load_synonyms(self) -> torch.Tensor:
        """[K, k] int64 synonym ids, nearest first (Token-EDA's replacement table)."""
        name = self.meta.get("synonyms_file")
        if not name or not (self.root / name).is_file():
            raise DatasetError(f"{self.root} has no synonym table; rebuild it with data.build.synonyms_k > 0")
        path = self.root / name
        self.check_file(name)
        table = self._tensor(path, "synonyms").to(torch.int32).long()
        if table.ndim != 2 or table.shape[0] != self.codebook_size:
            raise DatasetError(f"{path}: a {tuple(table.shape)} table, not [{self.codebook_size}, k] for the codebook")
        if table.numel() and int(table.max()) >= self.codebook_size:
            raise DatasetError(f"{path}: code {int(table.max(1).values.argmax())} has synonym {int(table.max())} >= "
                               f"codebook size {self.codebook_size} (corrupt)")
        return table

    def check_file(self, name: str) -> None:
        """A file beside dataset.json against the sha256 recorded at build time (when recorded)."""
        recorded = self.meta.get("file_sha256", {}).get(name)
        if recorded and sha256_file(self.root / name) != recorded:
            raise DatasetError(f"{self.root / name} has another sha256 than dataset.json records: the file is damaged "
                               "or was replaced")

    def _tensor(self, path: Path, key: str) -> torch.Tensor:
        """One tensor of a safetensors file of the dataset; a damaged file is named (not a bare SafetensorError)."""
        try:
            return load_file(str(path))[key]
        except Exception as exc:  # safetensors raises its own error type on a bad header
            raise DatasetError(f"{path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]}): the file is "
                               "damaged") from None

    def check_fingerprint(self, expected: str, what: str) -> None:
        """Refuse to mix tokens from one codebook with a model built on another."""
        if expected != self.fingerprint:
            raise DatasetError(
                f"codebook mismatch: the dataset {self.root} was tokenized with codebook "
                f"{self.fingerprint[:12]}…, but {what} uses codebook {expected[:12]}…. Token ids only mean "
                "something under the codebook that produced them; re-tokenize or use a matching checkpoint.")


def listing_problems(root: Path, meta: dict) -> list[str]:
    """What can be checked without reading a shard, one line per fault: the listed shards exist with
    their recorded sizes, the counts add up per split and in total, and no unlisted shard lies
    beside them (a listing that lost entries would otherwise drop their samples silently)."""
    problems, names = [], [s["name"] for s in meta["shards"]]
    if int(meta["chunk_size"]) <= 0:
        problems.append(f"{INFO_FILE}: chunk_size {meta['chunk_size']} must be > 0")
    if len(set(names)) != len(names):
        problems.append(f"{INFO_FILE} lists a shard twice: {sorted({n for n in names if names.count(n) > 1})[:5]}")
    for s in meta["shards"]:
        path = root / SHARD_DIR / s["name"]
        if not path.is_file():
            problems.append(f"shard {s['name']} is missing")
        elif s.get("bytes") is not None and path.stat().st_size != s["bytes"]:
            problems.append(f"shard {s['name']} has {path.stat().st_size} bytes, not the recorded {s['bytes']}")
        if int(s["count"]) < 0:
            problems.append(f"shard {s['name']} records {s['count']} samples")
    splits: dict[str, int] = {}
    for s in meta["shards"]:
        splits[s["split"]] = splits.get(s["split"], 0) + int(s["count"])
    recorded = meta.get("splits", splits)
    if recorded != splits or sum(splits.values()) != meta["num_samples"]:
        problems.append(f"{INFO_FILE}: its shards add up to {splits} ({sum(splits.values())} samples), but it "
                        f"records {recorded} ({meta['num_samples']}): shard entries were removed or edited")
    listed, shard_dir = set(names), root / SHARD_DIR
    unlisted = sorted(p.name for p in shard_dir.iterdir() if p.suffix == ".tar" and not p.name.startswith(".")
                      and p.name not in listed) if shard_dir.is_dir() else []
    if unlisted:
        problems.append(f"{len(unlisted)} shard file(s) not listed in {INFO_FILE}: {unlisted[:5]}")
    return problems


def check_listing(root: Path, meta: dict) -> None:
    problems = listing_problems(root, meta)
    if problems:
        raise DatasetError(f"{root}: {'; '.join(problems[:3])}{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}"
                           f"; scrub it with `python run.py task=verify data.root={root}`")


def storage_summary(meta: dict) -> dict:
    n = max(int(meta["num_samples"]), 1)
    # rounded: the digits of these numbers change dataset.json's size, which they describe
    summary = {"bytes_per_sample": round(meta["bytes_on_disk"] / n, 2)}
    if meta.get("source_bytes"):
        summary["percent_of_source"] = round(100.0 * meta["bytes_on_disk"] / meta["source_bytes"], 4)
    return summary


def split_id(info: TokenDatasetInfo, split: str) -> str:
    """What identifies a split's samples and their order: the codebook and its shards' names,
    counts and checksums. Embeddings and subset manifests carry it, so one made for another
    dataset (or a rebuilt one) is refused instead of silently misaligned."""
    h = hashlib.sha256(f"{info.fingerprint}:{split}:".encode())
    for s in info.shards(split):
        h.update(f"{s['name']}:{s['count']}:{s.get('sha256', '')};".encode())
    return h.hexdigest()
