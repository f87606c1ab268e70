"""What the one reader's checks cost: a validation pass of TokenStream, samples/s on one core.

Run it in this checkout and in a checkout of the commit before the one reader, on the same token
dataset, side by side:

    git worktree add /tmp/seit_before 1f03b8f
    python experiments/bench_reader.py --tokens data_cache/tokens/tiny20_patch_kmeans_s64p4k512 --repo /tmp/seit_before
    python experiments/bench_reader.py --tokens data_cache/tokens/tiny20_patch_kmeans_s64p4k512

Each pass is a fresh process-state read: the sha256 cache is cleared before every repeat, so the
"after" figure includes hashing every shard once (the cost a fresh worker pays once per shard).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", required=True, help="a token dataset dir")
    parser.add_argument("--split", default="train")
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="the checkout to measure")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.repo) / "src"))
    import torch

    from seit.data.dataset_info import TokenDatasetInfo
    from seit.data.token_stream import TokenStream

    torch.set_num_threads(1)
    info = TokenDatasetInfo.open(args.tokens)
    codec = info.load_codec()
    if "specs" in inspect.signature(TokenStream).parameters:
        from seit.data import shard_reader

        def stream():
            shard_reader._VERIFIED.clear()  # every repeat hashes every shard again
            return TokenStream(info.shard_specs(args.split), codec=codec, batch_size=256, train=False)
    else:
        def stream():
            return TokenStream(info.shards(args.split), info.shard_paths(args.split), codec=codec,
                               codebook_size=info.codebook_size, grid=info.grid, chunk_size=info.meta["chunk_size"],
                               batch_size=256, train=False)
    best, n = float("inf"), 0
    for _ in range(args.repeats):
        start = time.perf_counter()
        n = sum(len(b["key"]) for b in stream())
        best = min(best, time.perf_counter() - start)
    print(json.dumps({"repo": args.repo, "tokens": args.tokens, "samples": n, "best_s": round(best, 4),
                      "samples_per_s": round(n / best)}))


if __name__ == "__main__":
    main()
