"""Streaming token shards with webdataset: the CPU side only reads and decodes.

Training (after OpenCLIP): the shard list is split by node, then by worker, and every worker
resamples shards from its own part with its own seeded RNG (seed, epoch, rank, worker). When
there are fewer shards than rank x worker slots, every worker resamples from all shards instead,
so no worker is ever left empty. Each worker yields exactly ``batches_per_worker`` full batches:
every rank gets the same number of steps and DDP never waits on a rank that ran dry. The epoch comes from a shared counter that the training
loop advances, so persistent workers reshuffle every epoch.

Evaluation: every worker of every rank walks all shards in order and decodes only the chunks
whose global index falls to it (``index % (world * workers)``), so each sample is seen exactly
once over all ranks, whatever the number of shards, and no rank is ever handed nothing.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from seit.data.chunk import CHUNK_EXT, decode_chunk
from seit.data.codec import Codec, CodecError, get_codec


class ShardReadError(RuntimeError):
    """A shard that is truncated or corrupt; the message names the shard (and chunk)."""


class SharedEpoch:
    """An epoch counter that DataLoader workers read at the start of each pass."""

    def __init__(self, epoch: int = 0):
        self.value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return self.value.value


def _raise_shard_error(exn: Exception) -> bool:
    where = next((a for a in exn.args if isinstance(a, str) and a.endswith(".tar")), "an unknown shard")
    raise ShardReadError(f"cannot read shard {where}: {exn.args[0] if exn.args else exn!r} "
                         "(truncated or corrupt; re-run task=tokenize to rebuild it)") from exn


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TokenStream(IterableDataset):
    """Yields batches ``{"ids": uint16 [B,H,W], "label": int64 [B]}`` (+ ``"key"`` for eval)."""

    def __init__(self, shards: list[dict], paths: list[str], *, codec: str | Codec, codebook_size: int,
                 grid: tuple[int, int], chunk_size: int, batch_size: int, train: bool, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 2048,
                 epoch: SharedEpoch | None = None, model_dir: str | None = None,
                 keep: dict[str, np.ndarray] | None = None):
        """codec: a resolved Codec, or its name; a name is resolved in each worker process on first use,
        loading a codec model from model_dir (default: the dataset dir, i.e. the shards' parent dir).
        keep: {shard path: bool [count]} rows to use (a subset manifest); shards are then drawn in
        proportion to their kept rows and the epoch length counts kept rows only."""
        if keep is not None:
            used = [i for i, p in enumerate(paths) if keep[p].any()]
            shards, paths = [shards[i] for i in used], [paths[i] for i in used]
        self.keep = keep
        self.urls = list(paths)
        self.weights = [int(keep[p].sum()) for p in paths] if keep is not None else None
        self.chunk_size = chunk_size
        self.model_dir = model_dir or (str(Path(paths[0]).parent.parent) if paths else None)
        self._codec = codec if isinstance(codec, Codec) else None
        self.expected_chunks = {p: -(-s["count"] // chunk_size) for s, p in zip(shards, paths)}
        self.codec, self.codebook_size, self.grid = getattr(codec, "name", codec), codebook_size, tuple(grid)
        self.batch_size, self.train = batch_size, train
        self.rank, self.world_size, self.num_workers = rank, world_size, max(num_workers, 1)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.epoch = epoch or SharedEpoch()
        total = sum(self.weights) if keep is not None else sum(s["count"] for s in shards)
        rank_batches = -(-total // (batch_size * world_size))
        self.batches_per_worker = -(-rank_batches // self.num_workers)

    def __len__(self) -> int:
        """Batches per rank per epoch (training), as Lightning's progress and schedules need."""
        return self.batches_per_worker * self.num_workers

    # -- stages ----------------------------------------------------------------------------
    def _resampled_urls(self, rng: random.Random, worker: int) -> Iterator[dict]:
        urls = self.urls
        weights = self.weights
        if len(urls) >= self.world_size * self.num_workers:
            urls = urls[self.rank :: self.world_size][worker :: self.num_workers]
            weights = weights and weights[self.rank :: self.world_size][worker :: self.num_workers]
        while True:
            yield {"url": rng.choices(urls, weights)[0] if weights else rng.choice(urls)}

    def _checked(self, samples: Iterator[dict]) -> Iterator[dict]:
        """Pass chunks through, and fail loudly when a shard ends with chunks missing."""
        url, seen = None, 0
        for sample in samples:
            if sample["__url__"] != url or sample.get("__chunk_index__") == 0:
                self._check_count(url, seen)
                url, seen = sample["__url__"], 0
            seen += 1
            yield sample
        self._check_count(url, seen)

    def _check_count(self, url: str | None, seen: int) -> None:
        if url is not None and seen != self.expected_chunks[url]:
            raise ShardReadError(f"shard {url} holds {seen} chunks, dataset.json expects "
                                 f"{self.expected_chunks[url]}: the shard is truncated")

    def _decode(self, sample: dict) -> dict:
        where = f"chunk {sample['__key__']} of shard {sample['__url__']}"
        if CHUNK_EXT not in sample:
            raise ShardReadError(f"{where} has no .{CHUNK_EXT} member (members: {sorted(sample)})")
        if self._codec is None:  # once per process: a codec model is loaded here, not per chunk
            self._codec = get_codec(self.codec, model_dir=self.model_dir)
        try:
            chunk = decode_chunk(sample[CHUNK_EXT], self._codec)
        except CodecError as exc:
            raise ShardReadError(f"{where} is corrupt: {exc}") from exc
        if tuple(chunk.ids.shape[1:]) != self.grid:
            raise ShardReadError(f"{where} has a {chunk.ids.shape[1:]} grid, the dataset says {self.grid}")
        if chunk.ids.size and int(chunk.ids.max()) >= self.codebook_size:
            bad = int(np.argmax(chunk.ids.reshape(len(chunk), -1).max(1) >= self.codebook_size))
            raise ShardReadError(f"{where}: sample {chunk.keys[bad]!r} has id {int(chunk.ids[bad].max())} "
                                 f">= codebook size {self.codebook_size}")
        return {"chunk": chunk, "__url__": sample["__url__"], "__chunk_index__": sample["__chunk_index__"]}

    def _with_chunk_index(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            sample["__chunk_index__"] = int(sample["__key__"].rsplit("-", 1)[1])
            yield sample

    def _unchunk(self, samples: Iterator[dict]) -> Iterator[tuple]:
        for sample in samples:
            chunk = sample["chunk"]
            rows = range(len(chunk))
            if self.keep is not None:
                first = sample["__chunk_index__"] * self.chunk_size
                rows = np.flatnonzero(self.keep[sample["__url__"]][first:first + len(chunk)])
            for i in rows:
                yield chunk.ids[i], chunk.labels[i], chunk.keys[i]

    def _batches(self, samples: Iterator[tuple], partial: bool, keys: bool) -> Iterator[dict]:
        while True:
            block = list(itertools.islice(samples, self.batch_size))
            if not block or (len(block) < self.batch_size and not partial):
                return
            batch = {"ids": torch.from_numpy(np.stack([b[0] for b in block])),
                     "label": torch.tensor([int(b[1]) for b in block], dtype=torch.int64)}
            if keys:
                batch["key"] = [b[2] for b in block]
            yield batch

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        worker, _ = _worker()
        slot = self.rank * self.num_workers + worker
        if self.train:
            rng = random.Random(f"{self.seed}-{self.epoch.get()}-{slot}")
            stream = wds.DataPipeline(
                lambda: self._resampled_urls(rng, worker),
                wds.tarfile_to_samples(handler=_raise_shard_error),
                self._with_chunk_index, self._checked, wds.map(self._decode), self._unchunk,
                wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2, rng=rng),
            )
            return itertools.islice(self._batches(iter(stream), partial=False, keys=False), self.batches_per_worker)
        slots = self.world_size * self.num_workers
        stream = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.tarfile_to_samples(handler=_raise_shard_error),
            self._with_chunk_index, self._checked,
            lambda src: (s for i, s in enumerate(src) if i % slots == slot),
            wds.map(self._decode), self._unchunk,
        )
        return self._batches(iter(stream), partial=True, keys=True)
