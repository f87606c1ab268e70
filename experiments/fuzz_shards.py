"""Bit-flip fuzz of the shard readers: how often does damage go through silently?

One bit is flipped at each byte of a real shard in turn (40 MNIST-like samples of 16x16 tokens,
K=256, chunks of 8, the shape of the case in issue 15), and each reader is run on the damaged
file. Outcomes: ``exact`` (the original samples), ``error`` (raised an error naming the shard),
``silent`` (returned fewer or altered samples without an error).

Readers: the pre-fix sequential reader (``read_shard`` as of commit 1f03b8f, loaded from git),
and the current one reader with and without dataset.json's checksums (structure-only shows what
the strict tar/count/value checks catch by themselves).

    python experiments/fuzz_shards.py            # prints a Markdown table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from seit.data import shard_reader  # noqa: E402
from seit.data.dataset_info import CODEBOOK_FILE, SHARD_DIR, TokenDatasetInfo, save_codebook, write_dataset_info  # noqa: E402
from seit.data.shard_writer import write_shard  # noqa: E402

BEFORE = "1f03b8f"


def legacy_reader():
    """read_shard(path, codec) as it was before the one reader (tarfile, stops at a bad header)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:src/seit/data/shard_reader.py"],
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("legacy_shard_reader")
    exec(compile(source, "legacy_shard_reader.py", "exec"), module.__dict__)
    return module.read_shard


def build(root: Path, n: int, seed: int) -> TokenDatasetInfo:
    """A one-shard val split of n samples with spatially correlated ids (like real token maps)."""
    import torch

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4))
    ids = np.kron(coarse, np.ones((4, 4), int)).astype(np.uint16)
    noise = rng.random(ids.shape) < 0.3
    ids[noise] = rng.integers(0, 256, int(noise.sum()))
    labels = rng.integers(0, 10, n)
    fingerprint = save_codebook(root / CODEBOOK_FILE, torch.randn(256, 8))
    rec = write_shard(root / SHARD_DIR / "val-000000.tar", ids, labels, [f"val/{i:05d}.png" for i in range(n)],
                      split="val", codec="zstd-planes", codebook_size=256, chunk_size=8)
    write_dataset_info(root, shards=[rec.to_dict()], grid=(16, 16), codebook_size=256, codebook_dim=8,
                       codec="zstd-planes", chunk_size=8, codebook_sha256=fingerprint,
                       classes=[str(c) for c in range(10)], source_bytes=0)
    return TokenDatasetInfo.open(root)


def fuzz(info: TokenDatasetInfo, read) -> Counter:
    path = Path(info.shard_specs("val")[0].path)
    clean = path.read_bytes()
    want = read()
    outcomes = Counter()
    try:
        for pos in range(len(clean)):
            damaged = bytearray(clean)
            damaged[pos] ^= 1 << (pos % 8)
            path.write_bytes(bytes(damaged))
            shard_reader._VERIFIED.clear()
            try:
                got = read()
            except Exception as exc:  # noqa: BLE001 - any error counts; is it named?
                outcomes["error" if path.name in str(exc) else "unnamed error"] += 1
                continue
            same = len(got[0]) == len(want[0]) and all(np.array_equal(a, b) for a, b in zip(got, want))
            outcomes["exact" if same else "silent"] += 1
    finally:
        path.write_bytes(clean)
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        info = build(Path(tmp), args.samples, args.seed)
        codec, spec = info.load_codec(), info.shard_specs("val")[0]
        old = legacy_reader()

        def concat(chunks):
            chunks = list(chunks)
            return (np.concatenate([c.ids for c in chunks]) if chunks else np.zeros((0, 16, 16)),
                    np.concatenate([c.labels for c in chunks]) if chunks else np.zeros(0))

        bare = type(spec)(**{**spec.__dict__, "sha256": None, "bytes": None})
        readers = {f"before ({BEFORE}, read_shard)": lambda: concat(old(spec.path, codec)),
                   "after, one reader": lambda: concat(shard_reader.read_shard(spec, codec)),
                   "after, structure only (no sha256/size)": lambda: concat(shard_reader.read_shard(bare, codec))}
        size = Path(spec.path).stat().st_size
        print(f"one bit flipped at each of the {size:,} bytes of a {args.samples}-sample shard\n")
        print("| reader | exact | error naming the shard | unnamed error | silent (fewer or altered samples) |")
        print("|---|---:|---:|---:|---:|")
        results = {}
        for name, read in readers.items():
            c = fuzz(info, read)
            results[name] = dict(c)
            print(f"| {name} | {c['exact']} | {c['error']} | {c['unnamed error']} | **{c['silent']}** |", flush=True)
        print("\n" + json.dumps({"bytes": size, "samples": args.samples, "results": results}))


if __name__ == "__main__":
    main()
