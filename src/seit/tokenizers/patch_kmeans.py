"""A k-means patch codebook: the simplest real tokenizer, fitted on CPU in about a minute.

Each p x p RGB patch is projected onto its top-D principal components (D=32, like the
ViT-VQGAN codebook SeiT uses), and the id is its nearest k-means centroid in that space
(``seit.utils.kmeans``, faiss; ``seit.utils.nearest``).
Distances in the PCA space equal pixel-space squared error up to the dropped components, so
the nearest centroid is also the best reconstruction the codebook can give. Decoding maps a
centroid back through the PCA basis. The codebook is scaled to unit RMS so that the ViT sees
embeddings of a sensible magnitude, and rounded to float16, the precision it is stored at.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from seit.tokenizers.base import Tokenizer
from seit.tokenizers.codebook_tools import compaction_map
from seit.utils.io import atomic_save_tensors
from seit.utils.kmeans import kmeans
from seit.utils.nearest import nearest_code


class PatchKMeansTokenizer(Tokenizer):
    kind = "patch_kmeans"

    def __init__(self, image_size: int, patch_size: int, mean: torch.Tensor, basis: torch.Tensor,
                 scale: float, codebook: torch.Tensor, compaction: torch.Tensor | None = None):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.downsample = patch_size
        self.mean = mean  # [P]
        self.basis = basis  # [D, P], orthonormal rows
        self.scale = float(scale)
        self._codebook = codebook  # [K, D]
        self.compaction = compaction  # old id -> new id (-1 dropped) after compaction, else None

    @property
    def codebook(self) -> torch.Tensor:
        return self._codebook

    def to(self, device) -> "PatchKMeansTokenizer":
        self.mean, self.basis, self._codebook = (t.to(device) for t in (self.mean, self.basis, self._codebook))
        return self

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B*L, 3*p*p] in raster order; any H, W that are multiples of the patch size
        (fitted at image_size, applied to other sizes by TokenAdapt's training targets)."""
        p = self.downsample
        if images.shape[-1] % p or images.shape[-2] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {p}")
        cols = F.unfold(images.float(), kernel_size=p, stride=p)  # [B, P, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        return (patches - self.mean) @ self.basis.T / self.scale

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        g = (images.shape[-2] // self.downsample, images.shape[-1] // self.downsample)
        ids = nearest_code(self.project(self.patches(images)), self._codebook, metric="l2")
        return ids.reshape(images.shape[0], *g)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        b, gh, gw = ids.shape
        p = self.downsample
        patches = (self._codebook[ids.long().reshape(-1)] * self.scale) @ self.basis + self.mean
        cols = patches.reshape(b, gh * gw, -1).transpose(1, 2)
        images = F.fold(cols, output_size=(gh * p, gw * p), kernel_size=p, stride=p)
        return images.clamp(0, 1)

    @classmethod
    def fit(cls, images: torch.Tensor, *, patch_size: int, codebook_size: int, codebook_dim: int,
            max_patches: int, iters: int, seed: int) -> "PatchKMeansTokenizer":
        """Fit PCA + k-means on the patches of `images` ([N,3,S,S] in [0,1])."""
        gen = torch.Generator().manual_seed(seed)
        probe = cls(images.shape[-1], patch_size, torch.zeros(1), torch.zeros(1), 1.0, torch.zeros(1))
        patches = probe.patches(images)
        if patches.shape[0] > max_patches:
            patches = patches[torch.randperm(patches.shape[0], generator=gen)[:max_patches]]
        if codebook_dim > patches.shape[1]:
            raise ValueError(f"codebook_dim {codebook_dim} exceeds the patch dimension {patches.shape[1]} "
                             "(3 x patch_size^2)")
        mean = patches.mean(0)
        centered = patches - mean
        cov = centered.T @ centered / centered.shape[0]
        _, vecs = torch.linalg.eigh(cov.double())
        basis = vecs.flip(1)[:, :codebook_dim].T.float().contiguous()  # top-D principal directions
        coords = centered @ basis.T
        scale = float(coords.pow(2).mean().sqrt()) or 1.0
        points = coords / scale
        centroids = torch.from_numpy(kmeans(points.numpy(), codebook_size, niter=iters, seed=seed, backend="faiss"))
        # A code that no patch is nearest to moves onto a random patch (Lloyd's rule for an empty
        # cluster). faiss splits a big cluster instead, and on patches with fewer distinct values
        # than codes (flat images) that turns float noise into distinct codes no data needs.
        unused = torch.bincount(nearest_code(points, centroids), minlength=codebook_size) == 0
        centroids[unused] = points[torch.randint(points.shape[0], (int(unused.sum()),), generator=gen)]
        codebook = centroids.to(torch.float16).to(torch.float32)
        return cls(images.shape[-1], patch_size, mean, basis, scale, codebook)

    def compacted(self, counts: torch.Tensor) -> "PatchKMeansTokenizer":
        """The same tokenizer without the codes that `counts` (per-code usage) shows unused."""
        mapping = compaction_map(counts)
        keep = mapping >= 0
        return PatchKMeansTokenizer(self.image_size, self.downsample, self.mean, self.basis, self.scale,
                                    self._codebook[keep].clone(), compaction=mapping)

    def save(self, path: str | os.PathLike) -> None:
        tensors = {"mean": self.mean, "basis": self.basis, "codebook": self._codebook}
        if self.compaction is not None:
            tensors["compaction"] = self.compaction
        atomic_save_tensors(path, {k: v.contiguous() for k, v in tensors.items()},
                            metadata={"kind": self.kind, "image_size": str(self.image_size),
                                      "patch_size": str(self.downsample), "scale": repr(self.scale)})

    @classmethod
    def from_state(cls, tensors: dict, metadata: dict) -> "PatchKMeansTokenizer":
        return cls(int(metadata["image_size"]), int(metadata["patch_size"]), tensors["mean"],
                   tensors["basis"], float(metadata["scale"]), tensors["codebook"], tensors.get("compaction"))

