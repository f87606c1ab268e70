"""TokenDataModule: a token dataset directory as Lightning train/val loaders.

World size and rank are read in ``setup()`` (never in ``__init__``, where torch.distributed is
not initialised yet). Loaders are plain ``torch.utils.data.DataLoader`` objects with
``batch_size=None`` over a ``TokenStream``, so Lightning still injects its seeded
``worker_init_fn``. It only reads: building a missing dataset, and checking that a finished one
was built as configured, is the pipelines' job (``pipelines.tokenize.prepare_token_dataset``),
done before this is made.
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from seit.data.batch_schedule import BatchSchedule
from seit.data.dataset_info import DatasetError, TokenDatasetInfo
from seit.data.shard_reader import read_split
from seit.data.subset import read_subset
from seit.data.token_stream import SharedEpoch, TokenStream

log = logging.getLogger(__name__)


class TokenDataModule(BatchSchedule, pl.LightningDataModule):
    def __init__(self, cfg: DictConfig, *, seed: int = 0):
        """`cfg` is the ``data`` config group."""
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.epoch = SharedEpoch()
        self.info: TokenDatasetInfo | None = None
        self.restricted: frozenset[int] | None = None  # restrict_classes(): only these labels are loaded
        self._arrays: dict[str, tuple] = {}

    def load_info(self) -> TokenDatasetInfo:
        if self.info is None:
            self.info = TokenDatasetInfo.open(self.cfg.root)
        return self.info

    def setup(self, stage: str | None = None) -> None:
        self.load_info()

    def check_labelled(self, *splits: str, read: bool = False) -> None:
        """Refuse splits holding unlabelled samples (label -1): classification fails on them at the
        first batch, or, restricted to some classes (continual), skips them without a word. The
        counts are dataset.json's ``unlabelled`` (tokenize records it); a dataset without it is
        checked by reading the labels when ``read`` (a caller that reads the split anyway)."""
        info = self.load_info()
        recorded = info.meta.get("unlabelled")
        for split in splits:
            if recorded is not None:
                n = int(recorded.get(split, 0))
            elif read:
                n = int((self.split_arrays(split)[1] < 0).sum())
            else:
                continue
            if n:
                raise DatasetError(f"{info.root}: split {split!r} holds {n} unlabelled samples (label -1) of "
                                   f"{info.num_samples(split)}; classification needs a label on every train and val "
                                   "sample (tokenize class subfolders, or tar samples each with a .cls); unlabelled "
                                   "data suits task=pretrain_mtm and task=embed")

    @property
    def num_classes(self) -> int:
        return len(self.load_info().classes)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def stream(self, split: str, train: bool) -> TokenStream:
        info = self.load_info()
        rank, world = self._rank_world()
        batch = self.train_batch_size() if train else self.cfg.eval_batch_size
        return TokenStream(info.shard_specs(split), codec=info.codec, keep=self.row_masks(split), batch_size=batch,
                           train=train, rank=rank, world_size=world, num_workers=self.cfg.num_workers, seed=self.seed,
                           shuffle_buffer=self.cfg.shuffle_buffer, epoch=self.epoch, model_dir=str(info.root))

    def restrict_classes(self, classes) -> None:
        """Load only samples of these labels from now on (continual learning: one task's classes)."""
        self.restricted = frozenset(int(c) for c in classes)

    def split_arrays(self, split: str) -> tuple:
        """(ids, labels, samples per shard) of a whole split, read once and kept."""
        if split not in self._arrays:
            self._arrays[split] = read_split(self.load_info(), split)
        return self._arrays[split]

    def row_masks(self, split: str) -> dict | None:
        """Per-shard rows to load: the ``data.subset`` manifest's, and of them the restricted classes'."""
        masks = self.subset_masks(split)
        if self.restricted is None:
            return masks
        _, labels, counts = self.split_arrays(split)
        wanted = np.isin(labels, sorted(self.restricted))
        bounds = np.cumsum([0, *counts])
        paths = self.load_info().shard_paths(split)
        rows = {p: wanted[a:b] for p, a, b in zip(paths, bounds[:-1], bounds[1:])}
        if masks is not None:
            rows = {p: rows[p] & masks[p] for p in paths}
        if not any(m.any() for m in rows.values()):
            raise ValueError(f"{self.load_info().root} split {split!r} has no sample of classes {sorted(self.restricted)}")
        return rows

    def subset_masks(self, split: str) -> dict | None:
        """Row masks of the ``data.subset`` manifest, for the split it was made for (else None)."""
        if not self.cfg.get("subset"):
            return None
        subset = read_subset(self.cfg.subset)
        if subset.split != split:
            return None
        if subset.meta["num_kept"] == 0:
            raise ValueError(f"data.subset={subset.root} keeps no sample of split {split!r}: nothing to train on")
        log.info("data.subset=%s: %d of %d %s samples (%s)", subset.root, subset.meta["num_kept"],
                 subset.meta["num_total"], split, subset.meta.get("method"))
        return subset.shard_masks(self.load_info())

    def _loader(self, stream: TokenStream) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=self.cfg.pin_memory,
                          persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.stream(self.cfg.train_split, train=True))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.stream(self.cfg.val_split, train=False))
