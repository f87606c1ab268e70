"""Class-incremental Tiny-ImageNet-20 (5 tasks x 4 classes): tokens against JPEG pixels per memory budget.

    python experiments/continual_tiny20.py --seeds 0 1             # the budget grid, ER + herding
    python experiments/continual_tiny20.py --seeds 2 --budgets 100KB  # a third seed where the target is
    python experiments/continual_tiny20.py --seeds 0 1 --methods   # distill and DER++ at 100 KB
    python experiments/continual_tiny20.py --seeds 0 --no-memory   # the lower bound: budget 0
    python experiments/continual_tiny20.py --report --seeds 0 1 2  # the tables of RESULTS.md
    python experiments/continual_tiny20.py --capacity              # exemplars each memory holds per budget

Every run is ``python run.py experiment=continual_{tokens,pixels} task.memory.budget=B ...``;
finished runs (a summary.json in their dir) are skipped, so the script resumes.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from resumable_runs import OUT, run_once

BUDGETS = ("100KB", "1MB", "10MB")
REPRESENTATIONS = ("tokens", "pixels")
METHODS = ("er", "distill", "derpp")


def run_dir(rep: str, budget: str, method: str, seed: int):
    return OUT / "logs" / "continual" / "runs" / f"cl20_{rep}_{budget}_{method}_s{seed}"


def overrides(rep: str, budget: str, method: str, seed: int) -> list[str]:
    """The run.py overrides of one run of the protocol (experiments/gpu_suite.py reuses them)."""
    return [f"experiment=continual_{rep}", f"task.memory.budget={budget}", f"task.method={method}", f"seed={seed}"]


def run(rep: str, budget: str, method: str, seed: int) -> None:
    run_once(overrides(rep, budget, method, seed), run_dir(rep, budget, method, seed))


def load(rep: str, budget: str, method: str, seeds) -> list[dict]:
    out = []
    for s in seeds:
        path = run_dir(rep, budget, method, s) / "summary.json"
        if path.is_file():
            out.append(json.loads(path.read_text()))
    return out


def pm(values: list[float]) -> str:
    v = 100 * np.array(values)
    return f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def report(seeds) -> None:
    print("| budget | representation | exemplars held (after the last task) | B / exemplar | avg incremental acc | "
          "final acc | forgetting | runs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for budget in ("0B", *BUDGETS):  # 0B: no memory, the lower bound (run with --no-memory)
        for rep in REPRESENTATIONS:
            runs = load(rep, budget, "er", seeds)
            if not runs:
                continue
            held = [r["memory"][-1]["exemplars"] for r in runs]
            per = [r["memory"][-1]["bytes_per_exemplar"] or 0 for r in runs]
            print(f"| {budget} | {rep} | {np.mean(held):,.0f} | {np.mean(per):,.0f} | "
                  f"{pm([r['average_incremental_accuracy'] for r in runs])} | {pm([r['final_accuracy'] for r in runs])} | "
                  f"{pm([r['forgetting'] for r in runs])} | {len(runs)} |")
    print("\n| budget | tokens − pixels, avg incremental acc, per seed (pp) | mean | final acc, mean (pp) |")
    print("|---|---|---:|---:|")
    for budget in BUDGETS:  # paired by seed: a seed fixes the class order and the initialisation
        pairs = [(load("tokens", budget, "er", [s]), load("pixels", budget, "er", [s])) for s in seeds]
        pairs = [(t[0], p[0]) for t, p in pairs if t and p]
        if pairs:
            aia = [100 * (t["average_incremental_accuracy"] - p["average_incremental_accuracy"]) for t, p in pairs]
            final = [100 * (t["final_accuracy"] - p["final_accuracy"]) for t, p in pairs]
            print(f"| {budget} | {' / '.join(f'{g:+.1f}' for g in aia)} | {np.mean(aia):+.1f} | {np.mean(final):+.1f} |")
    print("\n| method (100 KB) | seed | tokens: avg inc. / final | pixels: avg inc. / final | gap, avg inc. (pp) | "
          "exemplars tokens / pixels |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in METHODS:
        for seed in seeds:
            tok, pix = load("tokens", "100KB", method, [seed]), load("pixels", "100KB", method, [seed])
            if not (tok and pix) or method == "er" and not load("tokens", "100KB", "distill", [seed]):
                continue  # ER rows only next to the seeds the other methods ran
            t, p = tok[0], pix[0]
            print(f"| {method} | {seed} | {100 * t['average_incremental_accuracy']:.1f} / {100 * t['final_accuracy']:.1f} | "
                  f"{100 * p['average_incremental_accuracy']:.1f} / {100 * p['final_accuracy']:.1f} | "
                  f"{100 * (t['average_incremental_accuracy'] - p['average_incremental_accuracy']):+.1f} | "
                  f"{t['memory'][-1]['exemplars']:,} / {p['memory'][-1]['exemplars']:,} |")


def capacity() -> None:
    """Exemplars of all 20 classes that fit each budget, by real encoding (no training needed)."""
    import sys

    sys.path.insert(0, str(OUT / "src"))
    from seit.continual.memory import JpegSamples, ReplayMemory, TokenSamples, parse_bytes
    from seit.data.dataset_info import TokenDatasetInfo
    from seit.data.image_source import scan_source
    from seit.data.shard_reader import read_split

    stores = {}
    for name, root in (("tokens (ctx-rans)", "tiny20_patch_kmeans_s64p4k512"),
                       ("tokens (zstd-planes)", "tiny20_patch_kmeans_s64p4k512_zstd")):
        info = TokenDatasetInfo.open(OUT / "data_cache" / "tokens" / root)
        ids, labels, _ = read_split(info, "train")
        stores[name] = TokenSamples(ids, labels, info.load_codec(), info.codebook_size)
    records = scan_source(OUT.parent / "shared" / "data" / "tiny-imagenet-20")[0]["train"]
    stores["JPEG files"] = JpegSamples(records, 64)
    for q in (75, 50, 25):
        stores[f"JPEG re-encoded q={q}"] = JpegSamples(records, 64, quality=q)
    print("| memory | " + " | ".join(BUDGETS) + " |")
    print("|---|" + "---:|" * len(BUDGETS))
    for name, store in stores.items():
        cells = []
        for budget in BUDGETS:
            memory = ReplayMemory(store, parse_bytes(budget), "reservoir_sampling", seed=0)
            stats = memory.update(0, np.arange(len(store.labels)), logit_dim=20)
            cells.append(f"{stats['exemplars']:,} ({stats['bytes_per_exemplar']:,.0f} B)")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", action="store_true", help="distill and DER++ at 100KB instead of the budget grid")
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=BUDGETS)
    ap.add_argument("--no-memory", action="store_true", help="the lower bound: ER with a budget of 0 bytes")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--capacity", action="store_true", help="exemplars held per budget and representation")
    args = ap.parse_args()
    if args.capacity:
        capacity()
        return
    if args.report:
        report(args.seeds)
        return
    if args.no_memory:
        for rep in REPRESENTATIONS:
            for seed in args.seeds:
                run(rep, "0B", "er", seed)
        return
    if args.methods:
        for method in METHODS[1:]:
            for rep in REPRESENTATIONS:
                for seed in args.seeds:
                    run(rep, "100KB", method, seed)
        return
    for budget in args.budgets:
        for rep in REPRESENTATIONS:
            for seed in args.seeds:
                run(rep, budget, "er", seed)


if __name__ == "__main__":
    main()
