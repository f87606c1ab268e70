"""Top-k class predictions for image files, through a trained classifier of ours and its tokenizer.

    from seit.predict import predict, write_csv
    rows = predict(model="run/classifier.safetensors", images="photos/", tokenizer="data.tokenizer.safetensors")
    write_csv(rows, "predictions.csv")

``model``: a ``classifier.safetensors`` export (task=train / task=continual write it into the run
dir; it holds the class names) or a Lightning ``.ckpt`` of such a run (its classes are then named
by ``classes=``, else by the ``dataset.json`` its run records, else they are the indices ``0..C-1``). ``images``: image files and folders,
folders searched recursively for the extensions of ``seit.data.image_source.IMAGE_EXTS``.

Preprocessing is the one the token dataset was built with (``task=tokenize``): each image is
decoded to RGB and squash-resized (bicubic) to the tokenizer's ``image_size``
(``seit.data.image_source.load_image``), scaled to [0, 1] and encoded to an id grid; the model's
evaluation view (its centre crop, ``LoadedModel.view``) is then applied by ``LoadedModel.logits``.
A pixel model takes the uint8 image resized to its input size and needs no tokenizer. A tokenizer
whose codebook differs from the one the model learned is refused (the error names the file): its ids
would mean other things to the model.

Output: one row per readable image, in sorted path order, in the **wide** format
``path, rank1_class, rank1_prob, ..., rankK_class, rankK_prob`` (probabilities are the softmax of
the logits; ``K = min(topk, number of classes)``). ``write_csv`` writes it atomically.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from seit.data.dataset_info import INFO_FILE
from seit.data.image_source import IMAGE_EXTS, ImageReadError, ImageRecord, load_image
from seit.tasks.checkpoint import LoadedModel, load_model
from seit.tokenizers import Tokenizer, load_tokenizer
from seit.tokenizers.base import ImageEncoder
from seit.utils.io import atomic_open

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"


class Predictions(list):
    """The rows (dicts keyed by ``columns``), plus the images that were skipped as unreadable and
    the tokenizer file used (None: a pixel model)."""

    def __init__(self, rows: Iterable[dict], columns: list[str], skipped: list[str], tokenizer: str | None = None):
        super().__init__(rows)
        self.columns = columns
        self.skipped = skipped
        self.tokenizer = tokenizer


def columns(k: int) -> list[str]:
    """``path, rank1_class, rank1_prob, ..., rankk_class, rankk_prob``."""
    return ["path"] + [f"rank{r}_{what}" for r in range(1, k + 1) for what in ("class", "prob")]


# -- inputs ------------------------------------------------------------------------------------
def list_images(images: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named: files as given, folders searched recursively (image extensions only),
    each folder's files in sorted order. FileNotFoundError names a path that is not there;
    ValueError when nothing is found."""
    items = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    if not items:
        raise ValueError("images: no image file or folder given")
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += _walk_images(path)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"images: {path} not found")
    if not found:
        raise ValueError(f"images: no {'/'.join(sorted(IMAGE_EXTS))} file in {', '.join(map(str, items))}")
    return found


def _walk_images(root: Path) -> list[Path]:
    """The image files under ``root`` in sorted order, through symlinked folders (each real folder once)."""
    seen, found = set(), []
    for dirpath, dirnames, files in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        found += [Path(dirpath) / f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTS]
    return sorted(p for p in found if p.is_file())


def read_classes(classes: str | os.PathLike | Sequence[str] | None, n: int, where: str) -> list[str] | None:
    """Class names from a list, or a text file with one name a line; they must be ``n``."""
    if classes is None:
        return None
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes)
        if not path.is_file():
            raise FileNotFoundError(f"classes: {path} not found (a text file with one class name a line)")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [str(c) for c in classes]
    if len(names) != n:
        raise ValueError(f"classes: {len(names)} names given, but {where} classifies {n} classes")
    return names


def input_size(path: Path) -> int:
    """The side of the input a classifier of ours was trained on: ids per side (tokens) or pixels."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {})["input_size"])
    hp = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]
    return int(hp["data"]["input_grid"] if "data" in hp else hp["input_grid"])


def recorded_dataset(model_path: Path) -> dict:
    """The ``dataset.json`` of the model's training data, if its run dir says (its ``summary.json``
    names the token dataset); {} otherwise."""
    # <run>/classifier.safetensors, <run>/checkpoints/x.ckpt
    for run_dir in (model_path.parent, model_path.parent.parent):
        summary = run_dir / SUMMARY_FILE
        if not summary.is_file():
            continue
        try:
            root = json.loads(summary.read_text()).get("dataset", {}).get("root")
            return json.loads((Path(root) / INFO_FILE).read_text()) if root else {}
        except (OSError, json.JSONDecodeError):
            return {}
    return {}


def recorded_tokenizer(model_path: Path) -> Path | None:
    """The tokenizer the model's training data was built with, if its run dir says: the run's
    ``summary.json`` names the token dataset, whose ``dataset.json`` names its tokenizer file."""
    path = (recorded_dataset(model_path).get("tokenizer") or {}).get("checkpoint")
    return Path(path) if path and Path(path).is_file() else None


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Predictor:
    """A loaded classifier and what turns images into its input; build it with ``Predictor.open``."""

    model: LoadedModel
    classes: list[str]
    size: int  # images are decoded at this side
    tokenizer: Tokenizer | None
    tokenizer_path: Path | None
    device: torch.device
    encoder: ImageEncoder | None = None  # images -> ids, on the device when the tokenizer can go there

    @classmethod
    def open(cls, model: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
             classes: str | os.PathLike | Sequence[str] | None = None, device: str = "auto") -> "Predictor":
        """Load ``model`` (and, for a token model, ``tokenizer``, default: the one its run's dataset records);
        refuse what cannot work: a model without a classifier head, a tokenizer of another codebook
        or grid, a token model without a tokenizer."""
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model: {path} not found (task=train writes <run>/classifier.safetensors)")
        loaded = load_model(path, "model")
        if loaded.num_classes == 0:
            raise ValueError(f"model: {path} is a {loaded.kind} model without a classifier head; predictions need a "
                             "classifier (task=train writes <run>/classifier.safetensors)")
        names = read_classes(classes, loaded.num_classes, str(path)) or loaded.classes
        recorded = recorded_dataset(path).get("classes")  # a .ckpt: its run's dataset names the classes
        names = names or (recorded if recorded and len(recorded) == loaded.num_classes else None)
        names = names or [str(i) for i in range(loaded.num_classes)]
        side = input_size(path)
        tok, tok_path = None, None
        if loaded.input == "tokens":
            tok_path = Path(tokenizer) if tokenizer else recorded_tokenizer(path)
            if tok_path is None:
                raise ValueError(f"model: {path} is a token model: name the tokenizer its dataset was built with "
                                 "(tokenizer=<data.root>.tokenizer.safetensors, written by task=tokenize)")
            tok = load_tokenizer(tok_path, what="tokenizer")
            if loaded.fingerprint is None:
                log.warning("%s records no codebook fingerprint: cannot check that %s is its tokenizer", path, tok_path)
            loaded.check_codebook(tok.fingerprint, f"the tokenizer {tok_path}")
            if getattr(tok, "any_size", False):
                tok.image_size = side * tok.downsample
            if tok.grid[0] != side:
                raise ValueError(f"tokenizer: {tok_path} makes {tok.grid[0]}x{tok.grid[1]} id grids, but {path} was "
                                 f"trained on {side}x{side} grids")
            size = tok.image_size
        else:
            if tokenizer:
                log.warning("%s is a pixel model; the tokenizer %s is not used", path, tokenizer)
            size = side
        dev = resolve_device(device)
        loaded.to(dev)
        return cls(loaded, names, size, tok, tok_path, dev, ImageEncoder(tok, dev) if tok is not None else None)

    @torch.no_grad()
    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, S, S] (S = ``size``) -> the model's input: ids [B, H, W] or the images."""
        return images.to(self.device) if self.encoder is None else self.encoder(images)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, C] (float32, CPU) of uint8 images [B, 3, S, S]."""
        return self.model.logits(self.inputs(images)).float().softmax(-1).cpu()


class _Images(Dataset):
    """Decodes one file; an unreadable one comes back as its error message (raised or skipped by the caller)."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        record = ImageRecord(key=self.paths[i].stem, label=-1, path=str(self.paths[i]))
        try:
            return i, load_image(record, self.size), None
        except ImageReadError as exc:
            return i, None, str(exc)


def _collate(items):
    return items


def predict(model: str | os.PathLike, images, tokenizer: str | os.PathLike | None = None, topk: int = 5,
            batch_size: int = 64, device: str = "auto", classes=None, skip_bad_images: bool = False,
            workers: int = 0, progress: bool = True) -> Predictions:
    """Top-``topk`` predictions for ``images`` (files and folders; see the module doc) with ``model``.

    ``tokenizer``: the tokenizer file of a token model (default: the one the model's run recorded
    through its dataset); ``classes``: names for a checkpoint without them (a list or a text file);
    ``device``: ``auto`` (GPU when present), ``cpu``, ``cuda:N``; ``workers``: decoding processes.
    An unreadable image stops the run with a line naming it (ImageReadError), unless
    ``skip_bad_images``: then it is left out and listed in ``.skipped``.
    Returns the rows, one per readable image (see ``columns``).
    """
    if topk < 1 or batch_size < 1:
        raise ValueError(f"topk={topk} and batch_size={batch_size} must be >= 1")
    predictor = Predictor.open(model, tokenizer, classes, device)
    paths = list_images(images)
    k = min(topk, len(predictor.classes))
    rows, skipped = [], []
    loader = DataLoader(_Images(paths, predictor.size), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate)
    bar = tqdm(total=len(paths), desc="predict", unit="image", disable=None if progress else True)
    for batch in loader:
        good = []
        for i, image, error in batch:
            if error is None:
                good.append((i, image))
            elif skip_bad_images:
                skipped.append(str(paths[i]))
            else:
                raise ImageReadError(f"{error} (skip_bad_images=true leaves such images out and lists them)")
        if good:
            probs = predictor.probabilities(torch.from_numpy(np.stack([image for _, image in good])))
            top = probs.topk(k, dim=1)
            for (i, _), values, indices in zip(good, top.values.tolist(), top.indices.tolist()):
                row = {"path": str(paths[i])}
                for r, (p, c) in enumerate(zip(values, indices), start=1):
                    row[f"rank{r}_class"], row[f"rank{r}_prob"] = predictor.classes[c], p
                rows.append(row)
        bar.update(len(batch))
    bar.close()
    if skipped:
        log.warning("%d unreadable image(s) skipped, e.g. %s", len(skipped), skipped[0])
    tok = str(predictor.tokenizer_path) if predictor.tokenizer_path else None
    return Predictions(rows, columns(k), skipped, tok)


def write_csv(rows: Predictions | list[dict], path: str | os.PathLike) -> Path:
    """The rows as a CSV (header ``columns``, probabilities with 6 decimals), written atomically."""
    path = Path(path)
    header = getattr(rows, "columns", None) or (list(rows[0]) if rows else ["path"])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    with atomic_open(path) as f:
        f.write(text.getvalue().encode())
    return path
