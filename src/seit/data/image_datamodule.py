"""ImageFolderDataModule: JPEG/PNG images for the pixel baseline, through the same task.

The CPU decodes and squash-resizes each image every epoch (that is what pixel training
costs); the random crop runs on the device, in the task, exactly as for tokens. The two parts of
DeiT's recipe that cannot run batched on the device live here, for the training split only:
RandAugment (per-image PIL ops, ``aug.auto_augment``) and repeated augmentation (a sampler,
``aug.repeated_aug``), both timm's.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset

from seit.data.batch_schedule import BatchSchedule
from seit.data.embedded import resolve_source
from seit.data.image_source import ImageRecord, load_image, scan_source


class ImageRecordDataset(Dataset):
    """Records -> {"images": uint8 [3,S,S], "label"}; ``transform`` (PIL RGB -> PIL RGB of the same size)
    runs on each squash-resized image, in the loader's worker."""

    def __init__(self, records: list[ImageRecord], size: int, transform: Callable[[Image.Image], Image.Image] | None = None):
        self.records, self.size, self.transform = records, size, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        pixels = load_image(rec, self.size)
        if self.transform is not None:
            image = self.transform(Image.fromarray(pixels.transpose(1, 2, 0)))
            pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()
        return {"images": torch.from_numpy(pixels), "label": torch.tensor(rec.label)}


def auto_augment_transform(policy: str, image_size: int) -> Callable[[Image.Image], Image.Image]:
    """timm's auto-augment ``policy`` (DeiT: ``rand-m9-mstd0.5-inc1``, RandAugment with 2 ops of magnitude
    9 +- N(0, 0.5), increasing-severity ops) as built by ``timm.data.create_transform`` for DeiT's
    training (bicubic, ImageNet mean as fill, translation up to 45% of ``image_size``): its middle,
    per-image stage only. Its crop, flip and normalisation stages run on the device in the task, where
    RandomResizedCrop follows the crop-size curriculum; so RandAugment here sees the whole squash-resized
    image before the crop, where DeiT applies it after the crop (its colour ops commute with the crop;
    its geometric ones act on the whole image). Python's ``random`` and numpy draw the ops: every loader
    worker is seeded apart by torch (and by Lightning's ``seed_everything(workers=True)``, per rank);
    with ``data.num_workers=0`` the main process draws them, seeded alike on every rank.

    Raises ValueError (naming ``aug.auto_augment``) for a policy timm does not parse.
    """
    try:
        _, per_image, _ = create_transform(image_size, is_training=True, auto_augment=policy,
                                           interpolation="bicubic", separate=True)
    except (AssertionError, KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"aug.auto_augment={policy!r} is not a timm auto-augment policy (DeiT: "
                         f"rand-m9-mstd0.5-inc1): {exc}") from None
    for stage in per_image.transforms:  # RandAugment / AugMix hold .ops, AutoAugment sub-policies of ops
        for op in [*getattr(stage, "ops", []), *(op for sub in getattr(stage, "policy", []) for op in sub)]:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize_zero_bits_black
    return per_image


def posterize_zero_bits_black(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize op, but keeping 0 bits gives a black image, as Pillow < 13 did: Pillow 13 refuses
    0 bits, which timm's increasing-severity RandAugment asks for at magnitude 10 (DeiT's m9 with
    mstd0.5 draws it for ~2% of its posterize ops) and its AutoAugment 'v0' below magnitude 2.5."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


class ImageFolderDataModule(BatchSchedule, pl.LightningDataModule):
    """``auto_augment``: a timm policy for the training images (None: off); ``repeated_aug``: each drawn
    training image this many times per epoch (1: off) - both from the ``aug`` config group."""

    def __init__(self, cfg: DictConfig, *, cache_dir: str, auto_augment: str | None = None,
                 repeated_aug: float = 1):
        super().__init__()
        if not repeated_aug >= 1:
            raise ValueError(f"aug.repeated_aug={repeated_aug} must be >= 1 (1 = off; DeiT: 3)")
        self.cfg = cfg
        self.cache_dir = cache_dir
        self.train_transform = auto_augment_transform(auto_augment, int(cfg.image_size)) if auto_augment else None
        self.repeated_aug = repeated_aug
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
        ds = ImageRecordDataset(records, self.cfg.image_size, self.train_transform if train else None)
        workers = self.cfg.num_workers
        order = {"shuffle": train}
        if train and self.repeated_aug != 1:
            order = {"sampler": self.repeat_sampler(ds)}
        return DataLoader(ds, batch_size=self.train_batch_size() if train else self.cfg.eval_batch_size,
                          drop_last=train, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=self.cfg.pin_memory, **order)

    def repeat_sampler(self, ds: Dataset) -> RepeatAugSampler:
        """timm's ``RepeatAugSampler`` (DeiT's RASampler; Hoffer et al. 2020, Berman et al. 2019): a random
        permutation (seeded by the epoch only, as DeiT's) whose first ~len/``repeated_aug`` images each come
        ``repeated_aug`` times in a row, cut to the dataset's length rounded down to 256 (timm's default):
        an epoch costs what a plain one does, and sees a third of the images, three augmentations each.

        Built for one replica, so on one device (the 24 h single-GPU target) the copies of an image come
        in a row, in one batch, as in DeiT on one GPU. Under DDP Lightning wraps it in its
        ``DistributedSamplerWrapper`` (a training loader is always wrapped with shuffle=True), which
        shuffles this epoch's list and gives each rank a 1/world share of it: the same volume as DeiT's
        per-rank sampler and every copy still in the epoch, but a copy lands on a random rank and batch
        where DeiT puts the copies on different ranks. We keep Lightning's wrapper rather than a per-rank
        sampler (``use_distributed_sampler=False``), which would change sampling for every other loader.
        Lightning calls ``set_epoch`` on it, directly or through the wrapper."""
        return RepeatAugSampler(ds, num_replicas=1, rank=0, shuffle=True, num_repeats=self.repeated_aug)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.cfg.train_split, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.cfg.val_split, train=False)


def input_grid(dm) -> int:
    """Side of the model input before cropping: the token grid or the image size."""
    if isinstance(dm, ImageFolderDataModule):
        return int(dm.cfg.image_size)
    return int(dm.load_info().grid[0])
