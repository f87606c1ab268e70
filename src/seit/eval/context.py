"""What every evaluator reads: the model, the data of a split, the images behind a token dataset,
its tokenizer, cached frozen features, and the ranks.

Work over ranks (``torchrun`` / ``srun``, read from the environment as the offline jobs do): a
split's shards (tokens) or images (pixels) are dealt ``i % world`` to ranks; results meet on rank
0 through files in the run dir (``gather``), so no process group is needed and nothing hangs on a
collective that another rank never reaches (``wait_for`` times out with what it waited for).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from seit.data.dataset_info import DatasetError, TokenDatasetInfo
from seit.data.embedded import resolve_source
from seit.data.image_source import ImageRecord, load_image, scan_source
from seit.data.shard_reader import read_shard
from seit.tasks.checkpoint import LoadedModel
from seit.utils.io import atomic_open
from seit.utils.ranks import all_exist, wait_for

log = logging.getLogger(__name__)
FEATURES_DIR = "features"


@dataclass
class EvalContext:
    """``cfg``: the whole run config; ``model``: on ``device``, in eval mode; ``output_dir``: the eval
    run dir (an evaluator writes under ``output_dir / <its name>``); ``train``: the pipelines'
    ``train(cfg) -> summary``, handed down so evaluators that fine-tune use the one training path."""

    cfg: DictConfig
    model: LoadedModel
    device: torch.device
    output_dir: Path
    rank: int = 0
    world: int = 1
    train: Callable[[DictConfig], dict] | None = None  # the training path (eval=transfer trains a derived run)
    _info: TokenDatasetInfo | None = None
    _records: dict | None = None
    _classes: list[str] | None = None
    _tokenizer: object | None = None
    _gathers: int = 0
    _features: dict = field(default_factory=dict)

    # -- the data ------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``tokens`` or ``images``: what data.root / data.source holds."""
        return str(self.cfg.data.kind)

    @property
    def batch_size(self) -> int:
        return int(self.cfg.task.batch_size)

    def info(self) -> TokenDatasetInfo | None:
        """The token dataset (data.kind=tokens), opened once; its codebook must be the model's."""
        if self.kind != "tokens":
            return None
        if self._info is None:
            self._info = TokenDatasetInfo.open(self.cfg.data.root)
            self.model.check_codebook(self._info.fingerprint, f"the dataset {self._info.root}")
        return self._info

    def classes(self) -> list[str]:
        """Class names of the data, in label order."""
        if self._classes is None:
            self._classes = list(self.info().classes) if self.kind == "tokens" else self._image_listing()[1]
        return self._classes

    def _image_listing(self) -> tuple[dict[str, list[ImageRecord]], list[str]]:
        if self._records is None:
            if self.kind == "tokens":
                source = self.info().meta.get("source")
                if not source:
                    raise DatasetError(f"{self.info().root}/dataset.json records no image source: this evaluator "
                                       "needs the images the tokens were made from")
            else:
                source = str(self.cfg.data.source)
            root = resolve_source(str(source), self.cfg.paths.cache_dir)
            try:
                splits, classes = scan_source(root)
            except (FileNotFoundError, ValueError) as exc:
                raise DatasetError(f"the images behind the data ({source}) cannot be listed: {exc}; this evaluator "
                                   "reads the original images (keep them, or tokenize a copy of the val split)") from None
            self._records = {"splits": splits, "classes": classes}
        return self._records["splits"], self._records["classes"]

    def source_records(self, split: str) -> list[ImageRecord]:
        """The image files of a split: the ones a token dataset was tokenized from (dataset.json
        ``source``), or the image folder's (data.kind=images), in sorted order."""
        splits, classes = self._image_listing()
        if split not in splits:
            raise DatasetError(f"the image source has no split {split!r}; it has {sorted(splits)}")
        records = splits[split]
        if self.kind == "tokens":
            info = self.info()
            skipped = int((info.meta.get("skipped") or {}).get("count", 0))
            expected = info.num_samples(split)
            if not expected <= len(records) <= expected + skipped or classes != list(info.classes):
                raise DatasetError(f"the images at {info.meta['source']} are no longer the ones {info.root} was "
                                   f"tokenized from: split {split!r} has {len(records)} images and {len(classes)} "
                                   f"classes, the dataset {expected} samples ({skipped} skipped) of {len(info.classes)}")
        return records

    def require_labels(self, labels: np.ndarray, split: str, who: str) -> None:
        """Refuse a split with unlabelled samples (label -1) for a labelled evaluator."""
        if (labels < 0).any():
            raise DatasetError(f"eval={who} needs labels, but split {split!r} of {self.data_name()} holds unlabelled "
                               "samples (label -1)")

    def check_classifier(self, who: str) -> None:
        """The model must have a classifier head over the data's classes (evaluators that score predictions)."""
        if self.model.num_classes == 0:
            self.model.logits(torch.zeros(0))  # raises: no classifier head, with what to use instead
        if self.model.num_classes != len(self.classes()):
            raise DatasetError(f"eval={who}: class count mismatch: {self.model.path} classifies {self.model.num_classes} "
                               f"classes, {self.data_name()} has {len(self.classes())}")

    def labelled_features(self, who: str, train_split: str | None, split: str | None) -> tuple | None:
        """(train features, train labels, eval features, eval labels, train split, eval split) for an
        evaluator that fits on frozen features (None = task.train_split / task.split); None on ranks
        other than 0. Unlabelled samples in either split are refused."""
        train_split, split = train_split or str(self.cfg.task.train_split), split or str(self.cfg.task.split)
        train, train_labels = self.features(train_split)
        test, test_labels = self.features(split)
        if self.rank != 0:
            return None
        self.require_labels(train_labels, train_split, who)
        self.require_labels(test_labels, split, who)
        return train, train_labels, test, test_labels, train_split, split

    def data_name(self) -> str:
        return str(self.cfg.data.root if self.kind == "tokens" else self.cfg.data.source)

    def image_size(self) -> int:
        """The side images are decoded at for this model: the tokenizer's (tokens), else data.image_size."""
        return int(self.tokenizer().image_size) if self.model.input == "tokens" else int(self.cfg.data.image_size)

    def batches(self, split: str, desc: str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(model inputs, labels int64) on the CPU over this rank's share of the split, every sample
        once: ids [B, H, W] of the token shards, or uint8 images [B, 3, S, S] of the image folder."""
        if self.kind == "tokens":
            info = self.info()
            if split not in info.meta["splits"]:
                raise DatasetError(f"{info.root} has no split {split!r}; it has {sorted(info.meta['splits'])}")
            specs = info.shard_specs(split)[self.rank::self.world]
            codec = info.load_codec()
            bar = tqdm(total=sum(s.count for s in specs), desc=desc or f"{split} (rank {self.rank})", unit="sample",
                       disable=None, leave=False)
            for spec in specs:
                for chunk in read_shard(spec, codec):
                    for start in range(0, len(chunk), self.batch_size):
                        ids = torch.from_numpy(chunk.ids[start:start + self.batch_size].astype(np.int64))
                        bar.update(len(ids))
                        yield ids, torch.from_numpy(chunk.labels[start:start + self.batch_size].astype(np.int64))
            bar.close()
            return
        records = self.source_records(split)[self.rank::self.world]
        size = int(self.cfg.data.image_size)
        for start in tqdm(range(0, len(records), self.batch_size), desc=desc or f"{split} (rank {self.rank})",
                          disable=None, leave=False):
            part = records[start:start + self.batch_size]
            images = torch.from_numpy(np.stack([load_image(r, size) for r in part]))
            yield images, torch.tensor([r.label for r in part], dtype=torch.int64)

    def tokenizer(self):
        """The token dataset's own tokenizer (dataset.json ``tokenizer.checkpoint``), whose codebook
        must be the dataset's: images tokenized with it give the ids the model was trained on."""
        if self._tokenizer is None:
            from seit.tokenizers import load_tokenizer

            info = self.info()
            if info is None:
                raise DatasetError("this evaluator tokenizes images, which needs a token dataset (data.kind=tokens) "
                                   "and its tokenizer")
            path = (info.meta.get("tokenizer") or {}).get("checkpoint")
            if self.cfg.task.get("tokenizer"):
                path = str(self.cfg.task.tokenizer)
            if not path or not Path(path).is_file():
                raise DatasetError(f"{info.root}: its tokenizer {path} is not there; pass task.tokenizer=PATH")
            tokenizer = load_tokenizer(path, what="task.tokenizer")
            info.check_fingerprint(tokenizer.fingerprint, f"the tokenizer {path}")
            if getattr(tokenizer, "any_size", False):
                tokenizer.image_size = int(info.meta.get("image_size") or tokenizer.image_size)
            self._tokenizer = tokenizer
        return self._tokenizer

    # -- running the model ---------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def features(self, split: str) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        """(float32 [N, dim] frozen features, int64 labels [N]) of the whole split on rank 0, (None,
        None) elsewhere; computed once per run (cached as ``features/<split>.npz`` in the run dir)."""
        if split in self._features:
            return self._features[split]
        path = self.output_dir / FEATURES_DIR / f"{split}.npz"
        if not path.is_file():
            feats, labels = [], []
            for x, y in self.batches(split, desc=f"features {split}"):
                with self.autocast():
                    feats.append(self.model.features(x.to(self.device)).float().cpu())
                labels.append(y)
            dim = self.model.dim
            feats = torch.cat(feats).numpy() if feats else np.zeros((0, dim), np.float32)
            labels = torch.cat(labels).numpy() if labels else np.zeros(0, np.int64)
            feats, labels = self.gather(feats), self.gather(labels)
            if self.rank == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_open(path) as f:
                    np.savez(f, features=feats, labels=labels)
        if self.rank != 0:
            self._features[split] = (None, None)
        else:
            with np.load(path) as z:
                self._features[split] = (z["features"], z["labels"])
        return self._features[split]

    def gather(self, array: np.ndarray) -> np.ndarray | None:
        """Rank 0: every rank's ``array`` concatenated in rank order; None on the other ranks. Every
        rank calls it the same number of times, in the same order (a call counter names the files)."""
        self._gathers += 1
        if self.world == 1:
            return array
        parts = [self.output_dir / ".gather" / f"{self._gathers:04d}.rank{r}.npy" for r in range(self.world)]
        parts[0].parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(parts[self.rank]) as f:
            np.save(f, array)
        if self.rank != 0:
            return None
        wait_for(all_exist(parts), f"every rank's part {parts[0].name[:4]} of the evaluation")
        out = np.concatenate([np.load(p) for p in parts])
        for p in parts:
            p.unlink()
        return out
