"""ImageFolderDataModule: JPEG/PNG images for the pixel baseline, through the same task.

The CPU decodes and squash-resizes each image every epoch (that is what pixel training
costs); the random crop runs on the device, in the task, exactly as for tokens.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from seit.data.embedded import resolve_source
from seit.data.image_source import ImageRecord, load_image, scan_source

class ImageRecordDataset(Dataset):
    def __init__(self, records: list[ImageRecord], size: int):
        self.records, self.size = records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        return {"images": torch.from_numpy(load_image(rec, self.size)), "label": torch.tensor(rec.label)}

class ImageFolderDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DictConfig, *, cache_dir: str):
        super().__init__()
        self.cfg = cfg
        self.cache_dir = cache_dir
        self.splits: dict[str, list[ImageRecord]] | None = None
        self.classes: list[str] = []
        self.restricted: frozenset[int] | None = None  # restrict_classes(): only these labels are loaded

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits, self.classes = scan_source(resolve_source(str(self.cfg.source), self.cache_dir))

    def restrict_classes(self, classes) -> None:
        """Load only images of these labels from now on (continual learning: one task's classes)."""
        self.restricted = frozenset(int(c) for c in classes)

    def records(self, split: str) -> list[ImageRecord]:
        self.setup()
        if split not in self.splits:
            raise ValueError(f"{self.cfg.source} has no split {split!r}; it has {sorted(self.splits)}")
        return self.splits[split]

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

    def _loader(self, split: str, train: bool) -> DataLoader:
        records = self.records(split)
        if self.restricted is not None:
            records = [r for r in records if r.label in self.restricted]
            if not records:
                raise ValueError(f"{self.cfg.source} split {split!r} has no image of classes {sorted(self.restricted)}")
        ds = ImageRecordDataset(records, self.cfg.image_size)
        workers = self.cfg.num_workers
        return DataLoader(ds, batch_size=self.cfg.batch_size if train else self.cfg.eval_batch_size,
                          shuffle=train, drop_last=train, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=self.cfg.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.cfg.train_split, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.cfg.val_split, train=False)


def input_grid(dm) -> int:
    """Side of the model input before cropping: the token grid or the image size."""
    if isinstance(dm, ImageFolderDataModule):
        return int(dm.cfg.image_size)
    return int(dm.load_info().grid[0])
