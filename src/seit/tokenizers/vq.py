"""The learned VQ tokenizer behind the Tokenizer interface (``kind: vq``).

Saved as safetensors: the model weights plus its architecture as JSON metadata, so that
``load_tokenizer`` reopens it with nothing else; ``task=train_tokenizer`` writes one, and
``task=tokenize tokenizer.checkpoint=PATH`` uses it.
"""

from __future__ import annotations

import json
import os

import torch

from seit.data.dataset_info import upgraded
from seit.tokenizers.base import Tokenizer
from seit.tokenizers.codebook_tools import compaction_map
from seit.tokenizers.vq_model import VQModel
from seit.utils.io import atomic_save_tensors


class VQTokenizer(Tokenizer):
    kind = "vq"
    any_size = True  # fully convolutional: any image size that is a multiple of the downsampling
    bf16 = True

    def __init__(self, model: VQModel, image_size: int):
        self.model = model.eval()
        self.image_size = image_size
        self.downsample = model.downsample
        self.compaction: torch.Tensor | None = None  # old id -> new id (-1 dropped) after compaction
        self.copy_margin = 0.0  # rate-aware lookup (see CosineQuantizer.lookup); a tokenize-time setting

    @property
    def codebook(self) -> torch.Tensor:
        return self.model.quantizer.codebook.detach().cpu()

    def to(self, device) -> "VQTokenizer":
        self.model.to(device)
        return self

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {self.downsample}")
        return self.model.encode(images.float(), self.copy_margin)

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.decode(ids.long())

    def compacted(self, counts: torch.Tensor) -> "VQTokenizer":
        """The same tokenizer without the codes that `counts` (per-code usage) shows unused."""
        mapping = compaction_map(counts)
        keep = mapping >= 0
        config = {**self.model.config, "codebook_size": int(keep.sum())}
        model = VQModel(**config)
        state = self.model.state_dict()
        for name in ("embed", "usage", "embed_sum"):
            state[f"quantizer.{name}"] = state[f"quantizer.{name}"][keep].clone()
        model.load_state_dict(state)
        out = VQTokenizer(model, self.image_size)
        out.compaction = mapping
        return out

    def save(self, path: str | os.PathLike) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if self.compaction is not None:
            state["compaction"] = self.compaction
        atomic_save_tensors(path, state, metadata={"kind": self.kind, "image_size": str(self.image_size),
                                                   "config": json.dumps(self.model.config)})

    @classmethod
    def from_state(cls, tensors: dict, metadata: dict) -> "VQTokenizer":
        tensors = dict(tensors)
        compaction = tensors.pop("compaction", None)
        model = VQModel(**upgraded(json.loads(metadata["config"])))  # embed_dim in files saved before the rename
        model.load_state_dict(tensors)
        out = cls(model, int(metadata["image_size"]))
        out.compaction = compaction
        return out
