"""Storage report: the same token ids stored four ways, side by side.

- ``raw``: log2(K) bits per token, the information-free baseline (no container).
- ``seit``: SeiT's released format: escape bytes, one gzip stream, a gzipped offset index and
  a label file (re-implemented in ``seit_format``).
- ``zstd``: the ids as little-endian uint16 and labels as int32, one zstd-19 stream each.
- ``ours``: the dataset's own shards (tar headers, chunk headers, labels and keys included).

The codebook is a fixed cost that vanishes per sample at scale, so it is kept out of the rows
and reported on its own (SeiT ships float32, we store float16); so is a codec model.

Rows are measured on whole shards (at least ``max_samples`` samples) so that "ours" is exact;
decode samples/s is single-threaded, bytes to id arrays, i.e. per core.
"""

from __future__ import annotations

import gzip
import io
import math
import time

import numpy as np
import torch
import zstandard

from seit.data.chunk import decode_chunk
from seit.data.codec import Codec
from seit.data.dataset_info import CODEBOOK_FILE, TokenDatasetInfo
from seit.data.seit_format import escape_decode, escape_encode
from seit.data.shard_reader import load_shard, read_shard, stack, tar_members


def _read_shards(info: TokenDatasetInfo, codec: Codec, max_samples: int) -> tuple[list[bytes], np.ndarray, np.ndarray, int]:
    """Raw shard bytes of whole shards covering >= max_samples, and their decoded ids and labels."""
    specs, total = [], 0
    for shard in info.meta["shards"]:
        if total >= max_samples:
            break
        specs.append(info.spec(shard))
        total += shard["count"]
    # the one reader: the shards are checked, not just timed
    ids, labels = stack((chunk for spec in specs for chunk in read_shard(spec, codec)), info.grid)
    return [load_shard(spec) for spec in specs], ids, labels, total


def _timed(fn, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _ours_decode(blobs: list[bytes], codec: Codec) -> None:
    for blob in blobs:
        for _, payload in tar_members(blob, "a shard"):
            decode_chunk(payload, codec)


def _seit_files(ids: np.ndarray, labels: np.ndarray) -> dict[str, bytes]:
    per_image = [escape_encode(x) for x in ids]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in per_image])]).astype(np.int64)
    index = io.BytesIO()
    np.save(index, offsets)
    return {"data": gzip.compress(b"".join(per_image)), "index": gzip.compress(index.getvalue()),
            "labels": "".join(f"{int(l)}\n" for l in labels).encode()}


def _seit_decode(files: dict[str, bytes], tokens: int) -> None:
    data = gzip.decompress(files["data"])
    offsets = np.load(io.BytesIO(gzip.decompress(files["index"])))
    for i in range(len(offsets) - 1):
        escape_decode(data[offsets[i] : offsets[i + 1]], tokens)


def storage_report(info: TokenDatasetInfo, source_bytes_per_sample: float | None, max_samples: int = 20000) -> dict:
    codec = info.load_codec()
    blobs, ids, labels, n = _read_shards(info, codec, max_samples)
    k = info.codebook_size
    tokens = int(np.prod(info.grid))
    codebook = info.load_codebook()
    seit = _seit_files(ids, labels)
    ckpt = io.BytesIO()
    torch.save(codebook.float().clone(), ckpt)
    zc = zstandard.ZstdCompressor(level=19)
    zstd_ids = zc.compress(ids.astype("<u2").tobytes())
    zstd_labels = zc.compress(labels.astype("<i4").tobytes())
    zd = zstandard.ZstdDecompressor()

    rows = {
        "raw": {"bytes": n * tokens * math.log2(k) / 8, "decode_s": None},
        "seit": {"bytes": sum(len(v) for v in seit.values()), "decode_s": _timed(lambda: _seit_decode(seit, tokens), 1)},
        "zstd": {"bytes": len(zstd_ids) + len(zstd_labels),
                 "decode_s": _timed(lambda: np.frombuffer(zd.decompress(zstd_ids), "<u2").reshape(n, -1))},
        "ours": {"bytes": sum(len(b) for b in blobs),
                 "decode_s": _timed(lambda: _ours_decode(blobs, codec))},
    }
    model = info.meta.get("codec_model")
    report = {"samples": n, "tokens_per_sample": tokens, "codebook_size": k, "codec": info.codec,
              "codebook_bytes": {"seit": len(ckpt.getvalue()), "ours": (info.root / CODEBOOK_FILE).stat().st_size},
              "codec_model_bytes": (info.root / model).stat().st_size if model else 0, "rows": {}}
    for name, row in rows.items():
        per_sample = row["bytes"] / n
        entry = {"bytes_per_sample": round(per_sample, 2), "bits_per_token": round(per_sample * 8 / tokens, 3)}
        if source_bytes_per_sample:
            entry["percent_of_source"] = round(100 * per_sample / source_bytes_per_sample, 4)
        if row["decode_s"]:
            entry["decode_samples_per_s_per_core"] = round(n / row["decode_s"], 1)
        report["rows"][name] = entry
    report["ours_vs_seit"] = round(rows["seit"]["bytes"] / rows["ours"]["bytes"], 3)
    return report


def format_report(report: dict) -> str:
    lines = [f"storage on {report['samples']} samples x {report['tokens_per_sample']} tokens, K={report['codebook_size']} "
             "(container overhead included, codebook not; raw = log2 K bits, nothing else):",
             f"  {'format':<6} {'B/sample':>10} {'bits/token':>10} {'% source':>9} {'decode/s/core':>14}"]
    for name, row in report["rows"].items():
        pct = f"{row['percent_of_source']:.3f}" if "percent_of_source" in row else "-"
        speed = f"{row['decode_samples_per_s_per_core']:,.0f}" if "decode_samples_per_s_per_core" in row else "-"
        lines.append(f"  {name:<6} {row['bytes_per_sample']:>10.1f} {row['bits_per_token']:>10.3f} {pct:>9} {speed:>14}")
    cb = report["codebook_bytes"]
    lines.append(f"  SeiT's format / ours = {report['ours_vs_seit']:.2f}x; codebook file: ours {cb['ours']:,} B, "
                 f"SeiT {cb['seit']:,} B (once per dataset)"
                 + (f"; codec model {report['codec_model_bytes']:,} B" if report.get("codec_model_bytes") else ""))
    return "\n".join(lines)
