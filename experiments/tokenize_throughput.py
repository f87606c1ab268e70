"""Tokenize throughput and byte identity: this tree against an older revision, and 1 rank against 2.

    python experiments/tokenize_throughput.py --old-rev 5d899b9 --reps 2
    python experiments/tokenize_throughput.py --report

Every variant tokenizes tiny-imagenet-20 (10k train + 1k val JPEGs, 64 px, 11 shards) with the same
fitted k-means tokenizer (``--tokenizer``, default the one data=tiny_imagenet_20 fitted into
data_cache) through ``run.py task=tokenize``; the variants run in turn, ``--reps`` times, so a slow
spell of this machine hits each alike. ``wall_s`` is the whole command, start-up included (the same
for every variant); ``img_per_s`` is images / wall_s. Every output's shards must hash alike: the
script fails otherwise. Results: experiments/results/tokenize_throughput.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "experiments" / "results" / "tokenize_throughput.json"
SOURCE = REPO.parent / "shared" / "data" / "tiny-imagenet-20"
TOKENIZER = REPO / "data_cache" / "tokens" / "tiny20_patch_kmeans_s64p4k512.tokenizer.safetensors"


def overrides(root: Path, tokenizer: Path, workers: int) -> list[str]:
    return ["task=tokenize", "data=tiny_imagenet_20", f"data.root={root}", f"tokenizer.checkpoint={tokenizer}",
            "tokenizer.image_size=64", "tokenizer.patch_size=4", "tokenizer.codebook_size=512",
            f"data.build.source={SOURCE}", f"data.build.workers={workers}", "print_config=false",
            f"hydra.run.dir={root}.run", f"paths.log_dir={root}.logs"]


def shard_hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "shards").iterdir())}


def timed(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} … failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-rev", default=None, help="a git revision to compare against (its own run.py, same data)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        print(json.dumps(json.loads(OUT.read_text()), indent=1))
        return
    if not args.tokenizer.is_file():
        raise SystemExit(f"{args.tokenizer} not found: run `python run.py data=tiny_imagenet_20 task=tokenize` once")
    work = Path(tempfile.mkdtemp(prefix="tok_tp_"))
    py = sys.executable
    variants = {"this tree, 1 process": (REPO, [py, "run.py"]),
                "this tree, 2 ranks (torchrun)": (REPO, [py, "-m", "torch.distributed.run", "--standalone",
                                                         "--nproc_per_node=2", "run.py"])}
    if args.old_rev:
        old = work / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.old_rev], cwd=REPO, check=True,
                       capture_output=True)
        variants = {f"{args.old_rev}, 1 process": (old, [py, "run.py"]), **variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    hashes = {}
    try:
        for rep in range(args.reps):
            for i, (name, (cwd, cmd)) in enumerate(variants.items()):
                root = work / f"v{i}_r{rep}"
                times[name].append(timed([*cmd, *overrides(root, args.tokenizer, args.workers)], cwd))
                hashes[name] = shard_hashes(root)
                shutil.rmtree(root)
                print(f"{name}: {times[name][-1]:.1f}s", flush=True)
    finally:
        if args.old_rev:
            subprocess.run(["git", "worktree", "remove", "--force", str(work / "old")], cwd=REPO, capture_output=True)
    first = next(iter(hashes.values()))
    identical = all(h == first for h in hashes.values())
    images = 11000
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()}-core CPU", "images": images,
              "workers": args.workers, "identical_shards": identical, "shards": len(first),
              "variants": {name: {"wall_s": [round(t, 1) for t in ts], "img_per_s": round(images / min(ts), 1)}
                           for name, ts in times.items()},
              "command": " ".join(["python experiments/tokenize_throughput.py", *sys.argv[1:]])}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    if not identical:
        raise SystemExit("the variants wrote different shards")


if __name__ == "__main__":
    main()
