"""A semantic-segmentation set in the CamVid layout: ``<root>/<split>/images/*`` and
``<root>/<split>/masks/*.png`` with the same file stem, one 8-bit class id per mask pixel.

CamVid (SegNet's 11-class version, Brostow et al. 2008; Badrinarayanan et al. 2017) labels
0..10 and marks unlabelled pixels void = 11, which the loss and the score ignore. What would
score or train on the wrong labels is refused with the file named: an image without a mask (or
a mask without an image), a mask whose size is not its image's, a colour (RGB) mask, a label
above void.

Images are squash-resized (bicubic, as the tokenizers' input) to the evaluation size; masks are
kept at full resolution for scoring and reduced to the prediction grid for training by
``mask_to_grid`` (a per-cell majority vote, void included, so a mostly-void cell is ignored).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from seit.data.dataset_info import DatasetError
from seit.data.image_source import IMAGE_EXTS, to_rgb

CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
                  "pedestrian", "bicyclist")
MASK_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B")  # one integer label per pixel


@dataclass
class SegmentationSplit:
    """A split in memory: ``images`` uint8 ``[N, 3, H, W]`` at the evaluation size, ``masks`` the
    full-resolution label maps (uint8 ``[h_i, w_i]`` each, values 0..void), ``names`` the file stems."""

    images: torch.Tensor
    masks: list[torch.Tensor]
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)


def list_pairs(root: str | os.PathLike, split: str, what: str = "eval.segmentation.root") -> list[tuple[Path, Path]]:
    """(image, mask) paths of a split, sorted by stem. Raises DatasetError (one line, the file named)
    when the root or split is missing, an image has no mask or a mask no image."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{what}: {root} not found (a segmentation set: <split>/images/*.jpg and "
                           "<split>/masks/*.png with the same stems, e.g. CamVid)")
    image_dir, mask_dir = root / split / "images", root / split / "masks"
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise DatasetError(f"{what}: {root} has no {d.relative_to(root)}/ (split {split!r} needs images/ "
                               "and masks/)")
    images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS}
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
    for stem, path in sorted(images.items()):
        if stem not in masks:
            raise DatasetError(f"image {path} has no mask {mask_dir}/{stem}.png")
    for stem, path in sorted(masks.items()):
        if stem not in images:
            raise DatasetError(f"mask {path} has no image of the same stem in {image_dir}")
    if not images:
        raise DatasetError(f"{what}: {image_dir} holds no image")
    return [(images[s], masks[s]) for s in sorted(images)]


def read_mask(path: Path, void: int) -> np.ndarray:
    """The label map uint8 ``[H, W]`` of a mask file; refuses colour masks and labels above ``void``."""
    try:
        with Image.open(path) as img:
            if img.mode not in MASK_MODES:
                raise DatasetError(f"mask {path} has mode {img.mode}; a mask holds one class id per pixel "
                                   "(8-bit grey or palette PNG), not colours")
            mask = np.asarray(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read mask {path}: {exc}") from None
    top = int(mask.max()) if mask.size else 0
    if top > void:
        raise DatasetError(f"mask {path} holds label {top}, above void={void} (labels 0..{void - 1}, void={void})")
    return mask.astype(np.uint8)


def read_image(path: Path, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 ``[3, H, W]`` squash-resized bicubic to ``size`` = (H, W), the file's own (H, W))."""
    try:
        with Image.open(path) as img:
            own = (img.height, img.width)
            rgb = to_rgb(img).resize((size[1], size[0]), Image.Resampling.BICUBIC)
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy(), own
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None


def load_split(root: str | os.PathLike, split: str, size: tuple[int, int], *, void: int,
               limit: int | None = None, what: str = "eval.segmentation.root") -> SegmentationSplit:
    """A split's images at ``size`` = (H, W) and its full-resolution masks (the first ``limit`` pairs by stem).

    Raises DatasetError naming the file: a mask whose size differs from its image's, a colour mask,
    a label above ``void``, an unpaired image or mask.
    """
    from tqdm.auto import tqdm

    pairs = list_pairs(root, split, what)[:limit]
    images, masks = [], []
    for image_path, mask_path in tqdm(pairs, desc=f"segmentation {split}", unit="image", disable=None, leave=False):
        image, own = read_image(image_path, size)
        mask = read_mask(mask_path, void)
        if mask.shape != own:
            raise DatasetError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, its image {image_path.name} "
                               f"{own[1]}x{own[0]}: a mask must label every pixel of its image")
        images.append(image)
        masks.append(torch.from_numpy(mask))
    return SegmentationSplit(torch.from_numpy(np.stack(images)), masks, [p[0].stem for p in pairs])


def mask_to_grid(masks: torch.Tensor, grid: tuple[int, int], num_classes: int, void: int,
                 chunk: int = 16) -> torch.Tensor:
    """Training targets int64 ``[N, h, w]`` from label maps ``[N, H, W]`` (values 0..void).

    Each cell takes the label most of its pixels carry, void counted as a label (the share of
    each label in the cell is adaptive average pooling of the one-hot map); so a cell that is
    mostly void is void, and void stays the ignore label of the loss, never a class trained on.
    A tie goes to the lower id (a class before void). Cells are PyTorch's adaptive-pooling bins,
    so any H, W work; when h divides H and w divides W they are exact blocks.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got {tuple(masks.shape)}")
    if void != num_classes:
        raise ValueError(f"void={void} must be the label after the {num_classes} classes")
    out = []
    for start in range(0, len(masks), chunk):
        part = masks[start:start + chunk].long()
        onehot = F.one_hot(part, num_classes + 1).permute(0, 3, 1, 2).float()  # [n, C+1, H, W]
        share = F.adaptive_avg_pool2d(onehot, grid)
        out.append(share.argmax(1))
    return torch.cat(out) if out else torch.zeros((0, *grid), dtype=torch.long)
