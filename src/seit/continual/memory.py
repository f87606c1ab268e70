"""A replay memory whose budget is the encoded bytes of what it stores.

The memory holds, per class, one encoded payload: a token chunk through the dataset's codec
(``TokenSamples``) or the exemplars' JPEG files in a small container (``JpegSamples``), and for
DER++ the logits recorded when the class was learned (float16, ``n x classes seen`` each). Its
size is the length of those bytes, measured by encoding them, and replay decodes the same bytes,
so what is counted is exactly what is used.

After each task the memory is rebuilt from its old content plus the new task's samples. A
selection rule turns a capacity of K exemplars into a member set; the largest K whose encoding
fits the budget is found by bisection on real encodings, and the result is checked against the
budget before it is kept.

Selection rules (all class-incremental: a class's samples only arrive during its own task), named
for what they are (``memory.selection``):
- ``herding`` (iCaRL): per class, samples ranked by herding on the model's features when the class
  is learned; the memory keeps a balanced prefix of each ranking;
- ``reservoir_sampling``: reservoir sampling over everything seen, as bottom-K of a fixed random
  priority per sample, so the memory is a uniform sample of the stream at every capacity;
- ``class_balanced_reservoir`` (Chrysakis & Moens 2020): the task's samples are streamed in a
  seeded order; when full, a sample of a largest class makes room, or a sample of a largest class
  replaces one of its own class with probability stored / seen.
The old names ``random`` and ``reservoir`` are refused (``RENAMED``): ``reservoir`` meant the
class-balanced rule, so keeping it would read as the other one.
"""

from __future__ import annotations

import io
import json
import re
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zstandard
from PIL import Image

from seit.data.chunk import Chunk, decode_chunk, encode_chunk
from seit.data.image_source import ImageRecord, decode_image
from seit.utils.io import atomic_write_bytes, atomic_write_json

SELECTIONS = ("herding", "reservoir_sampling", "class_balanced_reservoir")
RENAMED = {"random": "reservoir_sampling", "reservoir": "class_balanced_reservoir"}  # old name -> its name now
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(value: int | str) -> int:
    """``100KB`` = 100,000 bytes (SI); ``100KiB`` = 102,400; a plain number is bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a byte count (e.g. 100KB, 1MB, 2MiB, 5000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


# -- what an exemplar is, per representation --------------------------------------------------
class TokenSamples:
    """A token split in RAM; a class's exemplars are stored as one chunk through the dataset's codec."""

    input_key = "ids"

    def __init__(self, ids: np.ndarray, labels: np.ndarray, codec, codebook_size: int):
        self.ids, self.labels, self.codec, self.codebook_size = ids, np.asarray(labels), codec, codebook_size

    def inputs(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.ids[idx])

    def encode(self, idx: np.ndarray) -> bytes:
        return encode_chunk(Chunk(self.ids[idx], self.labels[idx], [str(i) for i in idx]), self.codec,
                            self.codebook_size)

    def decode(self, payload: bytes) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        chunk = decode_chunk(payload, self.codec)
        return torch.from_numpy(chunk.ids), chunk.labels, np.array([int(k) for k in chunk.keys], dtype=np.int64)


class JpegSamples:
    """Image files; a class's exemplars are stored as their JPEG bytes in one container.

    ``quality=None`` keeps each file's own bytes; a quality re-encodes the resized image (a
    cheaper pixel memory, the usual way to fit more exemplars).
    """

    input_key = "images"
    _HEADER = struct.Struct("<4sIII")  # magic, n, labels bytes, keys bytes; then n uint32 sizes
    _MAGIC = b"SJPG"

    def __init__(self, records: list[ImageRecord], image_size: int, quality: int | None = None):
        self.records, self.size, self.quality = records, image_size, quality
        self.labels = np.array([r.label for r in records], dtype=np.int64)

    def inputs(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([decode_image(self._jpeg(i), self.size, self.records[i].where) for i in idx]))

    def _jpeg(self, i: int) -> bytes:
        data = self.records[i].read_bytes()
        if self.quality is None:
            return data
        pixels = decode_image(data, self.size, self.records[i].where).transpose(1, 2, 0)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=int(self.quality))
        return out.getvalue()

    def encode(self, idx: np.ndarray) -> bytes:
        files = [self._jpeg(int(i)) for i in idx]
        zc = zstandard.ZstdCompressor(level=19)
        labels = zc.compress(self.labels[idx].astype("<i4").tobytes())
        keys = zc.compress("\n".join(str(i) for i in idx).encode())
        sizes = np.array([len(f) for f in files], dtype="<u4").tobytes()
        return b"".join([self._HEADER.pack(self._MAGIC, len(files), len(labels), len(keys)), sizes, labels, keys, *files])

    def decode(self, payload: bytes) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        magic, n, n_labels, n_keys = self._HEADER.unpack_from(payload)
        if magic != self._MAGIC:
            raise ValueError(f"not a JPEG memory payload (magic {magic!r})")
        at = self._HEADER.size
        sizes = np.frombuffer(payload[at:at + 4 * n], dtype="<u4")
        at += 4 * n
        zd = zstandard.ZstdDecompressor()
        labels = np.frombuffer(zd.decompress(payload[at:at + n_labels]), dtype="<i4").astype(np.int64)
        keys = np.array(zd.decompress(payload[at + n_labels:at + n_labels + n_keys]).decode().split("\n"), dtype=np.int64)
        at += n_labels + n_keys
        images = []
        for k, size in zip(keys, sizes):
            images.append(decode_image(payload[at:at + int(size)], self.size, f"memory exemplar {k}"))
            at += int(size)
        if at != len(payload):
            raise ValueError(f"JPEG memory payload has {len(payload) - at} trailing bytes (corrupt)")
        return torch.from_numpy(np.stack(images)), labels, keys


# -- selection --------------------------------------------------------------------------------
def herding_order(features: np.ndarray) -> np.ndarray:
    """iCaRL herding: each step adds the sample that brings the running mean closest to the class mean."""
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    mu, total = f.mean(0), np.zeros(f.shape[1])
    free = np.ones(len(f), bool)
    order = []
    for k in range(1, len(f) + 1):
        dist = np.linalg.norm(mu[None] - (total[None] + f) / k, axis=1)
        dist[~free] = np.inf
        i = int(np.argmin(dist))
        order.append(i)
        free[i] = False
        total += f[i]
    return np.array(order, dtype=np.int64)


def balanced_quota(capacity: int, available: dict[int, int]) -> dict[int, int]:
    """Split ``capacity`` over classes as evenly as their available counts allow (water-filling;
    the remainder goes to the classes first in sorted order)."""
    quota, left, open_ = {c: 0 for c in available}, capacity, sorted(c for c, n in available.items() if n > 0)
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        for i, c in enumerate(list(open_)):
            take = min(share + (i < extra), available[c] - quota[c])
            quota[c] += take
            left -= take
        open_ = [c for c in open_ if quota[c] < available[c]]
    return quota


class ReplayMemory:
    """Exemplars per class (in priority order), their payloads, and DER++ logits when kept."""

    def __init__(self, samples, budget: int, selection: str = "herding", seed: int = 0, keep_logits: bool = False):
        if selection in RENAMED:
            raise ValueError(f"memory.selection={selection} is now called {RENAMED[selection]}: "
                             f"set task.memory.selection={RENAMED[selection]}")
        if selection not in SELECTIONS:
            raise ValueError(f"memory.selection must be one of {SELECTIONS}, got {selection!r}")
        if budget < 0:
            raise ValueError(f"memory budget must be >= 0 bytes, got {budget}")
        self.samples, self.budget, self.selection, self.seed = samples, int(budget), selection, seed
        self.keep_logits = keep_logits
        self.members: dict[int, np.ndarray] = {}  # class -> sample indices, highest priority first
        self.logits: dict[int, np.ndarray] = {}   # class -> float16 [n, classes seen when it was learned]
        self.seen: dict[int, int] = {}            # class -> samples streamed so far (class_balanced_reservoir)
        self.priority = np.random.default_rng([seed, 7]).random(len(samples.labels))  # reservoir_sampling
        self._payloads: dict[tuple[int, bytes], bytes] = {}

    # -- cost ---------------------------------------------------------------------------------
    def payload(self, cls: int, idx: np.ndarray) -> bytes:
        key = (cls, idx.tobytes())
        if key not in self._payloads:
            self._payloads[key] = self.samples.encode(idx)
        return self._payloads[key]

    def cost(self, members: dict[int, np.ndarray], logit_dims: dict[int, int]) -> int:
        """Bytes of the encoded payloads plus 2 bytes per stored logit."""
        total = sum(len(self.payload(c, idx)) for c, idx in members.items() if len(idx))
        if self.keep_logits:
            total += sum(2 * len(idx) * logit_dims[c] for c, idx in members.items())
        return total

    @property
    def nbytes(self) -> int:
        return self.cost(self.members, {c: v.shape[1] for c, v in self.logits.items()})

    def __len__(self) -> int:
        return sum(len(v) for v in self.members.values())

    # -- update after a task --------------------------------------------------------------------
    def update(self, task: int, new_idx: np.ndarray, logit_dim: int,
               features: Callable[[np.ndarray], np.ndarray] | None = None,
               logits: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
        """Rebuild the memory from its content and the task's samples ``new_idx``.

        ``features(idx)``: model features (herding); ``logits(idx)``: the logits over the classes
        seen so far (DER++), both evaluated on the model trained on this task.
        """
        new_idx = np.asarray(new_idx, dtype=np.int64)
        labels = self.samples.labels[new_idx]
        new_classes = sorted(set(labels.tolist()))
        clash = set(new_classes) & set(self.members)
        if clash:
            raise ValueError(f"classes {sorted(clash)} are already in the memory: class-incremental tasks bring new classes")
        by_class = {c: new_idx[labels == c] for c in new_classes}
        if self.selection == "herding":
            if features is None:
                raise ValueError("herding needs the model's features")
            by_class = {c: idx[herding_order(features(idx))] for c, idx in by_class.items()}
        new_logits = {}
        if self.keep_logits:
            if logits is None:
                raise ValueError("DER++ needs the model's logits")
            order = np.concatenate(list(by_class.values())) if by_class else new_idx
            values = logits(order).astype(np.float16)
            if values.shape[1] != logit_dim:
                raise ValueError(f"logits have {values.shape[1]} columns, expected {logit_dim}")
            pos = {int(i): r for r, i in enumerate(order)}
            new_logits = {c: (values, pos) for c in by_class}
        dims = {**{c: v.shape[1] for c, v in self.logits.items()}, **{c: logit_dim for c in by_class}}
        candidates = {**self.members, **by_class}
        total = sum(len(v) for v in candidates.values())
        select = self._selector(task, by_class, candidates)

        def fits(k: int) -> bool:
            return self.cost(select(k), dims) <= self.budget

        lo, hi = 0, total  # the largest k that fits, by bisection on measured encodings
        if fits(hi):
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        members = {c: idx for c, idx in select(lo).items()}
        cost = self.cost(members, dims)
        if cost > self.budget:  # the encoding is not monotone in k: never keep an over-budget memory
            raise AssertionError(f"memory of {cost} bytes exceeds its budget of {self.budget}")
        kept_logits = {}
        if self.keep_logits:
            for c, idx in members.items():
                if c in new_logits:
                    values, pos = new_logits[c]
                    kept_logits[c] = values[[pos[int(i)] for i in idx]]
                else:  # an old class: its exemplars are a subset of what was stored, logits follow
                    old = {int(i): r for r, i in enumerate(self.members[c])}
                    kept_logits[c] = self.logits[c][[old[int(i)] for i in idx]]
        self.members = {c: idx for c, idx in members.items() if len(idx)}
        self.seen.update({c: self.seen.get(c, 0) + len(v) for c, v in by_class.items()})
        self.logits = {c: v for c, v in kept_logits.items() if c in self.members}
        self._payloads = {k: v for k, v in self._payloads.items()
                          if k[0] in self.members and k[1] == self.members[k[0]].tobytes()}
        return self.stats()

    def _selector(self, task: int, by_class: dict[int, np.ndarray], candidates: dict[int, np.ndarray]):
        if self.selection == "reservoir_sampling":
            pool = np.concatenate(list(candidates.values()))
            pool = pool[np.argsort(self.priority[pool], kind="stable")]
            pool_labels = self.samples.labels[pool]

            def select(k: int) -> dict[int, np.ndarray]:
                top, lab = pool[:k], pool_labels[:k]
                return {c: top[lab == c] for c in candidates}
            return select
        if self.selection == "herding":
            def select(k: int) -> dict[int, np.ndarray]:
                quota = balanced_quota(k, {c: len(v) for c, v in candidates.items()})
                return {c: v[:quota[c]] for c, v in candidates.items()}
            return select
        return self._class_balanced_reservoir(task, by_class)

    def _class_balanced_reservoir(self, task: int, by_class: dict[int, np.ndarray]):
        stream = np.concatenate(list(by_class.values())) if by_class else np.zeros(0, np.int64)
        stream = stream[np.random.default_rng([self.seed, task, 11]).permutation(len(stream))]
        stream_labels = self.samples.labels[stream].tolist()
        start = {c: list(v) for c, v in self.members.items()}
        seen0 = dict(self.seen)

        def select(k: int) -> dict[int, np.ndarray]:
            rng = np.random.default_rng([self.seed, task, 13])
            mem = {c: list(v) for c, v in start.items()}
            seen = dict(seen0)
            size = sum(len(v) for v in mem.values())

            def largest() -> list[int]:
                most = max(len(v) for v in mem.values())
                return sorted(c for c, v in mem.items() if len(v) == most)

            def evict_from_largest() -> None:
                victims = largest()
                c = victims[rng.integers(len(victims))]
                mem[c].pop(int(rng.integers(len(mem[c]))))

            while size > k:  # a smaller capacity than before: shrink the largest classes first
                evict_from_largest()
                size -= 1
            for i, c in zip(stream.tolist(), stream_labels):
                seen[c] = seen.get(c, 0) + 1
                mem.setdefault(c, [])
                if size < k:
                    mem[c].append(i)
                    size += 1
                elif c not in largest():
                    evict_from_largest()
                    mem[c].append(i)
                elif mem[c] and rng.random() < len(mem[c]) / seen[c]:
                    mem[c][int(rng.integers(len(mem[c])))] = i
            return {c: np.array(v, dtype=np.int64) for c, v in mem.items()}
        return select

    def stats(self) -> dict:
        per_class = {int(c): len(v) for c, v in sorted(self.members.items())}
        logit_bytes = sum(2 * v.size for v in self.logits.values())
        n = len(self)
        return {"exemplars": n, "bytes": self.nbytes, "budget_bytes": self.budget, "logit_bytes": logit_bytes,
                "bytes_per_exemplar": round(self.nbytes / n, 2) if n else None, "per_class": per_class}

    # -- what replay trains on -------------------------------------------------------------------
    def replay_set(self) -> dict[str, torch.Tensor] | None:
        """Decoded from the stored bytes: inputs, labels, and (DER++) logits padded with a width mask."""
        if not self.members:
            return None
        inputs, labels, logits, dims = [], [], [], []
        width = max((v.shape[1] for v in self.logits.values()), default=0)
        for c in sorted(self.members):
            x, y, keys = self.samples.decode(self.payload(c, self.members[c]))
            if not np.array_equal(keys, self.members[c]):
                raise AssertionError(f"class {c}: the memory payload decodes to other samples than it holds")
            inputs.append(x)
            labels.append(torch.from_numpy(y))
            if self.keep_logits:
                v = np.zeros((len(y), width), np.float32)
                v[:, :self.logits[c].shape[1]] = self.logits[c]
                logits.append(torch.from_numpy(v))
                dims.append(torch.full((len(y),), self.logits[c].shape[1]))
        out = {"inputs": torch.cat(inputs), "labels": torch.cat(labels)}
        if self.keep_logits:
            out["logits"], out["logit_dims"] = torch.cat(logits), torch.cat(dims)
        return out

    # -- persistence -----------------------------------------------------------------------------
    def save(self, root: str | Path) -> None:
        """One payload file per class (and its logits); ``memory.json`` last, listing them."""
        root = Path(root)
        files = {}
        for c, idx in sorted(self.members.items()):
            atomic_write_bytes(root / f"class_{c}.bin", self.payload(c, idx))
            files[str(c)] = {"payload": f"class_{c}.bin", "exemplars": len(idx)}
            if self.keep_logits:
                atomic_write_bytes(root / f"class_{c}.logits", self.logits[c].astype("<f2").tobytes())
                files[str(c)].update(logits=f"class_{c}.logits", logit_dim=int(self.logits[c].shape[1]))
        atomic_write_json(root / "memory.json", {"selection": self.selection, "budget_bytes": self.budget,
                                                 "keep_logits": self.keep_logits, "seen": self.seen,
                                                 "classes": files, **self.stats()})

    def load(self, root: str | Path) -> None:
        root = Path(root)
        if not (root / "memory.json").is_file():
            raise FileNotFoundError(f"{root / 'memory.json'} is missing: the memory of that task was not saved; "
                                    f"delete {root.parent} to redo the task")
        meta = json.loads((root / "memory.json").read_text())
        if meta["selection"] != self.selection or meta["keep_logits"] != self.keep_logits:
            raise ValueError(f"{root} holds a {meta['selection']} memory (logits: {meta['keep_logits']}); this run "
                             f"uses {self.selection} (logits: {self.keep_logits})")
        self.members, self.logits, self._payloads = {}, {}, {}
        for c, entry in meta["classes"].items():
            path = root / entry["payload"]
            payload = path.read_bytes()
            try:
                _, _, keys = self.samples.decode(payload)
            except Exception as exc:  # codec, zstd and PIL errors alike: name the file
                raise ValueError(f"memory file {path} is corrupt ({exc}); delete {root.parent} to redo that task") from exc
            c = int(c)
            self.members[c] = keys
            self._payloads[(c, keys.tobytes())] = payload
            if self.keep_logits:
                raw = np.frombuffer((root / entry["logits"]).read_bytes(), dtype="<f2")
                self.logits[c] = raw.reshape(len(keys), entry["logit_dim"]).astype(np.float16)
        self.seen = {int(c): int(n) for c, n in meta["seen"].items()}
        if self.nbytes != meta["bytes"]:
            raise ValueError(f"{root}: the memory files hold {self.nbytes} bytes, memory.json says {meta['bytes']}")
