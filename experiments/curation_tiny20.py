"""Curation on a redundant pool: does SemDeDup find injected near-duplicates, and does pruning to
50% with SemDeDup + DBP train better than a random 50%?

    python experiments/redundant_pool.py         # the pool: tiny20 train + 3,000 near-duplicates
    python experiments/curation_tiny20.py        # embeddings, curation, training; then the tables
    python experiments/curation_tiny20.py --report

Embeddings (task=embed): ``thumb`` = the token map pooled to 8x8 cells, PCA-whitened to 64 dims
(a copy detector, for SemDeDup); ``mtm`` = the self-supervised MTM encoder of mtm_tiny20.py
(seed 0, labels never used), for SSP, DBP and retrieval; ``--semantic NAME=EXPORT`` puts another
self-supervised backbone there (e.g. ``dino=logs/pretrain_dino/runs/dino20_dino_s0/dino.safetensors``,
experiments/dino_tiny20.py), its embedding, subsets and runs named ``NAME_*``.
Training: ``experiment=tiny20_tokens`` at lr 1e-3, the same number of samples seen by every row
(78k: the full 13k pool for 6 epochs, 50% subsets for 12).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from resumable_runs import OUT, run_once
from redundant_pool import IMAGES, INJECTED, TOKENIZER, TOKENS

EMB = Path(f"{TOKENS}.embeddings")
MTM = OUT / "logs" / "pretrain_mtm" / "runs" / "mtm20_mtm_s0" / "mtm.safetensors"
BASE = ["experiment=tiny20_tokens", f"data.root={TOKENS}", f"data.build.source={IMAGES}", f"tokenizer.checkpoint={TOKENIZER}"]
EPS = (0.15, 0.2, 0.25, 0.3, 0.35)
DEDUP = ["curate=semdedup", f"task.embeddings={EMB}/thumb", "curate.kmeans.k=100", "curate.probes=3"]
DEDUP_EPS = 0.25


SEMANTIC = {"name": "mtm", "checkpoint": MTM}  # the semantic embedding (--semantic)


def tagged(name: str) -> str:
    """Subsets and runs that depend on the semantic embedding carry its name, unless it is the MTM one."""
    return name if SEMANTIC["name"] == "mtm" else f"{SEMANTIC['name']}_{name}"


def curate_dir(name: str) -> Path:
    return OUT / "logs" / "curate" / "runs" / f"cur20_{name}"


def train_dir(row: str, seed: int) -> Path:
    return OUT / "logs" / "train" / "runs" / f"cur20_{tagged(row) if row != 'full' else row}_s{seed}"


def embed_all() -> None:
    for name, extra in (("thumb", ["task.features=thumbnail", "task.thumbnail_grid=8", "task.whiten=64"]),
                        (SEMANTIC["name"], [f"task.checkpoint={SEMANTIC['checkpoint']}"])):
        run_once([*BASE, "task=embed", f"task.out_dir={EMB / name}", *extra], OUT / "logs" / "embed" / "runs" / f"cur20_{name}")


def curate_all() -> dict[str, Path]:
    for eps in EPS:
        run_once([*BASE, "task=curate", *DEDUP, f"curate.eps={eps}"], curate_dir(f"semdedup_eps{eps}"))
    # the same without probing the neighbouring clusters: pairs split by a boundary go unseen
    run_once([*BASE, "task=curate", *DEDUP, f"curate.eps={DEDUP_EPS}", "curate.probes=1"], curate_dir("semdedup_probes1"))
    # the semantic embedding instead of the copy descriptor, eps calibrated to remove as many
    run_once([*BASE, "task=curate", *DEDUP, f"task.embeddings={EMB / SEMANTIC['name']}", "curate.target_kept=0.7827"],
             curate_dir(f"semdedup_{SEMANTIC['name']}"))
    dedup = curate_dir(f"semdedup_eps{DEDUP_EPS}")
    emb = EMB / SEMANTIC["name"]
    semantic = [f"task.embeddings={emb}", "curate.kmeans.k=50"]
    rows = {
        "random": ["curate=random", f"task.embeddings={emb}"],
        "ssp": ["curate=ssp", *semantic],
        "dbp": ["curate=dbp", *semantic],
        "semdedup_dbp": ["curate=dbp", *semantic, f"curate.start_from={dedup}"],
        "semdedup_random": ["curate=random", f"task.embeddings={emb}", f"curate.start_from={dedup}"],
        "semdedup_dbp_easy": ["curate=dbp", *semantic, f"curate.start_from={dedup}", "curate.keep=easy"],
    }
    for name, overrides in rows.items():
        run_once([*BASE, "task=curate", "curate.keep_fraction=0.5", *overrides], curate_dir(tagged(name)))
    return {name: curate_dir(tagged(name)) for name in rows}


RETRIEVAL_CLASSES, SEEDS_PER_CLASS = 5, 10
RETRIEVAL = {  # slug: (what the table calls it, overrides)
    "sample4": ("sample-based, k=4", ["curate.mode=sample", "curate.k=4"]),
    "sample32": ("sample-based, k=32", ["curate.mode=sample", "curate.k=32"]),
    "sample64": ("sample-based, k=64", ["curate.mode=sample", "curate.k=64"]),
    "cluster50": ("cluster-based, 50 clusters, > 2 seeds", ["curate.mode=cluster", "curate.kmeans.k=50", "curate.min_seeds=2"]),
}


def labels_by_key() -> dict[str, int]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from seit.data.dataset_info import TokenDatasetInfo
    from seit.data.shard_reader import read_shard

    info = TokenDatasetInfo.open(TOKENS)
    return {k: int(lab) for spec in info.shard_specs("train") for c in read_shard(spec, info.load_codec())
            for k, lab in zip(c.keys, c.labels)}


def retrieval_seeds(labels: dict[str, int]) -> Path:
    """10 labelled originals from each of 5 classes (seeded); the pool is every other sample."""
    path = OUT / "logs" / "curate" / "cur20_retrieval_seeds.txt"
    if not path.is_file():
        rng = np.random.default_rng(0)
        keys = []
        for c in range(RETRIEVAL_CLASSES):
            originals = sorted(k for k, lab in labels.items() if lab == c and not k.endswith("_dup"))
            keys += [originals[i] for i in rng.choice(len(originals), SEEDS_PER_CLASS, replace=False)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(keys) + "\n")
    return path


def retrieval_all(labels: dict[str, int]) -> None:
    seeds = retrieval_seeds(labels)
    for slug, (_, overrides) in RETRIEVAL.items():
        for emb in (SEMANTIC["name"], "thumb"):
            run_once([*BASE, "task=curate", "curate=retrieval", f"task.embeddings={EMB / emb}", f"curate.seed_keys={seeds}",
                      *overrides], curate_dir(f"retrieval_{emb}_{slug}"))


def retrieval_table(labels: dict[str, int]) -> None:
    seeds = set(retrieval_seeds(labels).read_text().split())
    targets = {k for k, lab in labels.items() if lab < RETRIEVAL_CLASSES and k not in seeds}
    print(f"| retrieval ({len(seeds)} seeds, {len(targets)} target-class samples in the pool of "
          f"{len(labels) - len(seeds)}) | embedding | retrieved | precision | recall |\n|---|---|---:|---:|---:|")
    for slug, (name, _) in RETRIEVAL.items():
        for emb in (SEMANTIC["name"], "thumb"):
            d = curate_dir(f"retrieval_{emb}_{slug}")
            if not (d / "subset.tsv").is_file():
                continue
            got = [line.split("\t")[0] for line in (d / "subset.tsv").read_text().splitlines()[1:]]
            hit = sum(k in targets for k in got)
            print(f"| {name} | {emb} | {len(got)} | {100 * hit / max(len(got), 1):.1f}% | {100 * hit / len(targets):.1f}% |")
    print(f"(a random draw from the pool has precision {100 * len(targets) / (len(labels) - len(seeds)):.1f}%)")


def dedup_table() -> None:
    pairs = json.loads(INJECTED.read_text())["pairs"]
    print("| eps | probes | removed | injected pairs found | removed that are not injected (of removed / of clean images) |")
    print("|---:|---:|---:|---:|---:|")
    runs = [(eps, 3, curate_dir(f"semdedup_eps{eps}")) for eps in EPS] + [(DEDUP_EPS, 1, curate_dir("semdedup_probes1"))]
    runs.append((f"{SEMANTIC['name']} embedding, calibrated", 3, curate_dir(f"semdedup_{SEMANTIC['name']}")))
    for eps, probes, d in runs:
        if not (d / "subset.json").is_file():
            continue
        keys = [line.split("\t")[0] for line in (d / "subset.tsv").read_text().splitlines()[1:]]
        kept = set(keys)
        all_keys = (EMB / "thumb" / "keys.txt").read_text().splitlines()
        in_pair = {k for p in pairs for k in p}
        removed = [k for k in all_keys if k not in kept]
        found = np.mean([a not in kept or b not in kept for a, b in pairs])
        fp = sum(k not in in_pair for k in removed)
        clean = len(all_keys) - len(in_pair)
        print(f"| {eps} | {probes} | {len(removed)} | {100 * found:.1f}% | {fp} ({100 * fp / max(len(removed), 1):.1f}% / "
              f"{100 * fp / clean:.1f}%) |")


def subset_table() -> None:
    """Distinct images per subset: a kept injected pair counts once."""
    pairs = json.loads(INJECTED.read_text())["pairs"]
    print("| subset | kept | injected pairs with both kept | distinct images |\n|---|---:|---:|---:|")
    for name in ("random", "ssp", "dbp", "semdedup_dbp", "semdedup_random", "semdedup_dbp_easy"):
        f = curate_dir(tagged(name)) / "subset.tsv"
        if f.is_file():
            keys = {line.split("\t")[0] for line in f.read_text().splitlines()[1:]}
            both = sum(a in keys and b in keys for a, b in pairs)
            print(f"| {name} | {len(keys)} | {both} | {len(keys) - both} |")


def train_table(seeds: list[int]) -> None:
    print("| subset (50% of 13,000) | top-1 per seed | mean ± std |\n|---|---|---:|")
    for row in ("full", "random", "ssp", "dbp", "semdedup_dbp", "semdedup_random", "semdedup_dbp_easy"):
        vals = []
        for s in seeds:
            f = train_dir(row, s) / "summary.json"
            if f.is_file():
                vals.append(100 * json.loads(f.read_text())["metrics"]["val/acc1"])
        if vals:
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            print(f"| {row} | {' / '.join(f'{v:.1f}' for v in vals)} | {statistics.mean(vals):.1f} ± {std:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rows", default="random,semdedup_dbp,full,ssp,dbp")
    parser.add_argument("--semantic", default=None, help="NAME=EXPORT: the semantic embedding's backbone "
                        "(default: the MTM encoder of mtm_tiny20.py)")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.semantic:
        name, _, checkpoint = args.semantic.partition("=")
        SEMANTIC.update(name=name, checkpoint=Path(checkpoint))
    seeds = [int(s) for s in args.seeds.split(",")]
    labels = labels_by_key()
    if not args.report:
        embed_all()
        subsets = curate_all()
        retrieval_all(labels)
        for seed in seeds:
            for row in [r for r in args.rows.split(",") if r == "full" or r in subsets]:
                data = [] if row == "full" else [f"data.subset={subsets[row]}"]
                epochs = 6 if row == "full" else 12
                run_once([*BASE, *data, "optim.lr=1e-3", f"trainer.max_epochs={epochs}", f"seed={seed}"],
                         train_dir(row, seed))
    dedup_table()
    retrieval_table(labels)
    subset_table()
    train_table(seeds)


if __name__ == "__main__":
    main()
