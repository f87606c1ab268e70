"""Efficient training at equal wall-clock (Irandoust et al. 2022) on tiny-imagenet-20, tokens and pixels.

    python experiments/efficient_vit.py                # 2 inputs x 3 variants x 2 seeds, two runs at a time
    python experiments/efficient_vit.py --report       # table, time-to-accuracy, one figure of all curves
    python experiments/efficient_vit.py --bench-step   # step time with and without the locality MLP

Every run is ``experiment=vit24h_tiny20_{tokens,pixels}`` with the same training-time budget
(``trainer.max_time``, validation and checkpoints excluded; the cosine runs over the budget):
``plain`` = the ViT alone (``model.mlp_layer=null task.curriculum.start=null``), ``locality`` = +
the locality MLP, ``locality_curriculum`` = + the grid-size curriculum (the experiment as it is).
The pixel runs decode their JPEGs in the training loop, so the decode is inside their time.
Two runs share the machine at a time, one thread each, a token run beside the pixel run of the
same variant and seed, so both see the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from resumable_runs import OUT, ROOT, run_once

INPUTS = ("tokens", "pixels")
VARIANTS = {  # name: (label, overrides)
    "plain": ("ViT", ["model.mlp_layer=null", "task.curriculum.start=null"]),
    "locality": ("+ locality MLP", ["task.curriculum.start=null"]),
    "locality_curriculum": ("+ locality + curriculum", []),
}
RESULTS = ROOT / "experiments" / "results" / "efficient_vit"
THRESHOLDS = (0.2, 0.3, 0.4)


def run_dir(inp: str, variant: str, seed: int) -> Path:
    return OUT / "logs" / "train" / "runs" / f"eff20_{inp}_{variant}_s{seed}"


def train_all(seeds: list[int], budget: int | None, jobs: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    extra = [f"trainer.max_time={budget}"] if budget else []
    work = [([f"experiment=vit24h_tiny20_{inp}", f"seed={seed}", *VARIANTS[variant][1], *extra],
             run_dir(inp, variant, seed)) for seed in seeds for variant in VARIANTS for inp in INPUTS]
    with ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(run_once, overrides, where) for overrides, where in work]:
            future.result()


def load(inp: str, variant: str, seed: int) -> dict | None:
    path = run_dir(inp, variant, seed) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def final_top1(summary: dict) -> float:
    """Top-1 of the last validation: the weights at the end of the budget."""
    return summary["curve"][-1]["val/acc1"]


def time_to(curve: list[dict], threshold: float) -> float | None:
    """Training seconds of the first validation at or above ``threshold`` top-1 (None: never)."""
    return next((p["train_s"] for p in curve if p.get("val/acc1", 0) >= threshold), None)


def report(seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    rows, runs = [], {}
    for inp in INPUTS:
        for variant, (label, _) in VARIANTS.items():
            found = {s: summary for s in seeds if (summary := load(inp, variant, s)) is not None}
            if not found:
                continue
            runs[(inp, variant)] = found
            tops = [final_top1(s) for s in found.values()]
            rows.append({"input": inp, "variant": variant, "label": label,
                         "top1": {str(s): final_top1(v) for s, v in found.items()},
                         "mean": statistics.mean(tops), "epochs": [v["curve"][-1]["epoch"] + 1 for v in found.values()],
                         "samples_seen": [v["samples_seen"] for v in found.values()],
                         "budget_s": [v["budget"]["max_time_s"] for v in found.values()],
                         "train_s": [v["budget"]["train_seconds"] for v in found.values()],
                         "time_to": {str(t): [time_to(v["curve"], t) for v in found.values()] for t in THRESHOLDS}})
    plain = {r["input"]: r["mean"] for r in rows if r["variant"] == "plain"}
    for r in rows:
        r["gain_pp"] = 100 * (r["mean"] - plain[r["input"]]) if r["input"] in plain else None

    lines = ["| input | variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | vs plain | epochs | samples seen |",
             "|---|---|" + "---:|" * (len(seeds) + 4)]
    for r in rows:
        tops = " | ".join(f"{100 * r['top1'][str(s)]:.1f}%" if str(s) in r["top1"] else "" for s in seeds)
        gain = "" if r["gain_pp"] is None or r["variant"] == "plain" else f"{r['gain_pp']:+.1f} pp"
        lines.append(f"| {r['input']} | {r['label']} | {tops} | **{100 * r['mean']:.1f}%** | {gain} | "
                     f"{'/'.join(map(str, r['epochs']))} | {'/'.join(f'{n:,}' for n in r['samples_seen'])} |")
    lines += ["", "Training seconds to reach a top-1 (mean over seeds; '-': not reached within the budget):", "",
              "| input | variant | " + " | ".join(f"{int(100 * t)}%" for t in THRESHOLDS) + " |",
              "|---|---|" + "---:|" * len(THRESHOLDS)]
    for r in rows:
        cells = []
        for t in THRESHOLDS:
            reached = r["time_to"][str(t)]
            cells.append(f"{statistics.mean(reached):.0f} s" if reached and None not in reached else "-")
        lines.append(f"| {r['input']} | {r['label']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (RESULTS / "table.md").write_text(table)
    (RESULTS / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = dict(zip(VARIANTS, ("tab:gray", "tab:blue", "tab:red")))
    for ax, inp in zip(axes, INPUTS):
        for variant, (label, _) in VARIANTS.items():
            for i, (seed, summary) in enumerate(sorted(runs.get((inp, variant), {}).items())):
                curve = summary["curve"]
                ax.plot([p["train_s"] / 60 for p in curve], [100 * p["val/acc1"] for p in curve], color=colors[variant],
                        linestyle="-" if i == 0 else "--", marker=".", label=f"{label}" if i == 0 else None)
        ax.set_title(f"{inp} (solid seed 0, dashed seed 1)")
        ax.set_xlabel("training minutes (validation excluded)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val top-1 (%)")
    axes[0].legend(loc="lower right")
    fig.suptitle("tiny-imagenet-20, micro ViT, equal training-time budget")
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy_vs_time.png", dpi=120)
    print(f"figure: {RESULTS / 'accuracy_vs_time.png'}")


def bench_step(rounds: int, batch: int) -> None:
    """Forward + backward + AdamW step of the micro ViT on the 7x7 grid, with and without the
    locality MLP, alternating; the median of ``rounds`` timings of 5 steps each."""
    import torch

    from seit.models.vit import TokenViT

    torch.manual_seed(0)
    shapes = {"tokens": dict(input="tokens", input_size=14, codebook_size=512, codebook_dim=32),
              "pixels": dict(input="pixels", input_size=56, patch_size=8)}
    out = {}
    for inp, kw in shapes.items():
        models = {name: TokenViT(num_classes=20, embed_dim=128, depth=4, num_heads=4, mlp_layer=layer, **kw)
                  for name, layer in (("mlp", None), ("locality", "locality"))}
        x = torch.randn(batch, 32 if inp == "tokens" else 3, kw["input_size"], kw["input_size"])
        y = torch.randint(0, 20, (batch,))
        opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}
        times = {n: [] for n in models}
        for r in range(rounds + 1):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(5):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    opts[name].zero_grad()
                    loss.backward()
                    opts[name].step()
                if r:  # round 0 warms up
                    times[name].append((time.perf_counter() - start) / 5)
        med = {n: statistics.median(t) for n, t in times.items()}
        params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
        out[inp] = {"step_s": med, "ratio": med["locality"] / med["mlp"], "params": params}
        print(f"{inp}: step {1000 * med['mlp']:.1f} ms (MLP) vs {1000 * med['locality']:.1f} ms (locality): "
              f"x{out[inp]['ratio']:.3f}; params {params['mlp']:,} vs {params['locality']:,}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    device = f"CPU, {torch.get_num_threads()} threads"
    (RESULTS / "step_time.json").write_text(json.dumps({"device": device, "batch": batch, **out}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget", type=int, default=None, help="training seconds per run (default: the experiment's)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--bench-step", action="store_true")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    if args.bench_step:
        bench_step(args.rounds, args.batch)
    elif args.report:
        report(args.seeds)
    else:
        train_all(args.seeds, args.budget, args.jobs)
        report(args.seeds)


if __name__ == "__main__":
    main()
