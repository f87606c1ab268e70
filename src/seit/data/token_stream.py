"""Streaming token shards with webdataset: the CPU side only reads and decodes.

Every shard is read by the one reader (``shard_reader.read_chunks``), which checks what
dataset.json promises; webdataset composes the stages and shuffles.

Training (after OpenCLIP): the shard list is split by node, then by worker, and every worker
resamples shards from its own part with its own seeded RNG (seed, epoch, rank, worker). When
there are fewer shards than rank x worker slots, every worker resamples from all shards instead,
so no worker is ever left empty. Each worker yields exactly ``batches_per_worker`` full batches:
every rank gets the same number of steps and DDP never waits on a rank that ran dry. The epoch
comes from a shared counter that the training loop advances, so persistent workers reshuffle
every epoch.

Evaluation: each sample is seen exactly once over all ranks. Chunk ``c`` of the split (counted
over all shards in order) goes to rank ``c % world`` and, within it, to worker
``(c // world) % workers``; every worker walks all shards and decodes only its own chunks. When
the split has fewer chunks than ranks, samples are dealt to ranks one by one instead (every rank
decodes every chunk; such splits are tiny), so that no rank is left without a batch, which would
make the others wait for it forever. A split with fewer samples than ranks is refused.
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

from seit.data.codec import Codec, get_codec
from seit.data.dataset_info import DatasetError, ShardSpec
from seit.data.shard_reader import ShardReadError, read_chunks

__all__ = ["SharedEpoch", "ShardReadError", "TokenStream"]


class SharedEpoch:
    """An epoch counter that DataLoader workers read at the start of each pass."""

    def __init__(self, epoch: int = 0):
        self.value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return self.value.value


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TokenStream(IterableDataset):
    """Yields batches ``{"ids": uint16 [B,H,W], "label": int64 [B]}`` (+ ``"key"`` for eval)."""

    def __init__(self, specs: list[ShardSpec], *, codec: str | Codec, batch_size: int, train: bool, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 2048,
                 epoch: SharedEpoch | None = None, model_dir: str | None = None,
                 keep: dict[str, np.ndarray] | None = None):
        """specs: the split's shards (``TokenDatasetInfo.shard_specs``).
        codec: a resolved Codec, or its name; a name is resolved in each worker process on first use,
        loading a codec model from model_dir (default: the dataset dir, the shards' parent dir).
        keep: {shard path: bool [count]} rows to use (a subset manifest); shards are then drawn in
        proportion to their kept rows and the epoch length counts kept rows only.

        Raises DatasetError when there is nothing to read: no shard with a sample to use (training),
        or fewer samples than ranks (evaluation)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be > 0")
        self.keep = keep
        used = [s for s in specs if (keep[s.path].any() if keep is not None else s.count > 0)]
        self.specs = used if train else list(specs)
        self.weights = [int(keep[s.path].sum()) for s in used] if keep is not None else None
        self._codec = codec if isinstance(codec, Codec) else None
        self.codec = getattr(codec, "name", codec)
        self.model_dir = model_dir or (str(Path(specs[0].path).parent.parent) if specs else None)
        self.batch_size, self.train = batch_size, train
        self.rank, self.world_size, self.num_workers = rank, world_size, max(num_workers, 1)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.epoch = epoch or SharedEpoch()
        total = sum(self.weights) if keep is not None else sum(s.count for s in used)
        where = f"{specs[0].split!r} split of {len(specs)} shard(s)" if specs else "an empty split"
        if total == 0:
            raise DatasetError(f"the {where} has no sample to {'train' if train else 'evaluate'} on")
        if not train and total < world_size:
            raise DatasetError(f"the {where} has {total} samples, fewer than the {world_size} ranks: every rank "
                               "needs at least one (run with fewer devices)")
        self.num_chunks = sum(s.num_chunks for s in specs)
        rank_batches = -(-total // (batch_size * world_size))
        self.batches_per_worker = -(-rank_batches // self.num_workers)

    def __len__(self) -> int:
        """Batches per rank per epoch (training), as Lightning's progress and schedules need."""
        return self.batches_per_worker * self.num_workers

    # -- stages ----------------------------------------------------------------------------
    def _resampled(self, rng: random.Random, worker: int) -> Iterator[ShardSpec]:
        specs, weights = self.specs, self.weights
        if len(specs) >= self.world_size * self.num_workers:
            specs = specs[self.rank :: self.world_size][worker :: self.num_workers]
            weights = weights and weights[self.rank :: self.world_size][worker :: self.num_workers]
        while True:
            yield rng.choices(specs, weights)[0] if weights else rng.choice(specs)

    def _codec_here(self) -> Codec:
        if self._codec is None:  # once per process: a codec model is loaded here, not per chunk
            self._codec = get_codec(self.codec, model_dir=self.model_dir)
        return self._codec

    def _samples(self, specs: Iterator[ShardSpec], select=lambda spec, index: True) -> Iterator[tuple]:
        """(ids [H,W], label, key) of the chosen chunks of each shard, keep-mask applied."""
        codec = self._codec_here()
        for spec in specs:
            for index, chunk in read_chunks(spec, codec, lambda c: select(spec, c)):
                rows = range(len(chunk))
                if self.keep is not None:
                    first = index * spec.chunk_size
                    rows = np.flatnonzero(self.keep[spec.path][first:first + len(chunk)])
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

    def _eval_samples(self, worker: int) -> Iterator[tuple]:
        world, workers = self.world_size, self.num_workers
        if self.num_chunks >= world:  # whole chunks: rank c % world, then worker (c // world) % workers
            offsets = dict(zip((s.path for s in self.specs),
                               itertools.accumulate((s.num_chunks for s in self.specs), initial=0)))

            def mine(spec: ShardSpec, index: int) -> bool:
                c = offsets[spec.path] + index
                return c % world == self.rank and (c // world) % workers == worker

            yield from self._samples(iter(self.specs), mine)
            return
        if worker == 0:  # a tiny split: deal samples to ranks one by one, worker 0 of each rank reads
            yield from itertools.islice(self._samples(iter(self.specs)), self.rank, None, world)

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        worker, _ = _worker()
        if self.train:
            rng = random.Random(f"{self.seed}-{self.epoch.get()}-{self.rank * self.num_workers + worker}")
            stream = wds.DataPipeline(lambda: self._samples(self._resampled(rng, worker)),
                                      wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2, rng=rng))
            return itertools.islice(self._batches(iter(stream), partial=False, keys=False), self.batches_per_worker)
        return self._batches(self._eval_samples(worker), partial=True, keys=True)
