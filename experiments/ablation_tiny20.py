"""The SeiT augmentation ablation on tiny-imagenet-20: each row adds one augmentation, 2 seeds.

    python experiments/ablation_tiny20.py --tokenadapt logs/train_tokenadapt/runs/ta_tiny20/tokenadapt.safetensors
    python experiments/ablation_tiny20.py --report        # the table from the runs' summary.json files
    python experiments/ablation_tiny20.py --tag long --extra trainer.max_epochs=100 optim.lr=1e-3   # a longer budget

Every row is ``run.py experiment=tiny20_tokens`` (micro ViT, 15 epochs, 14x14 crops of the 16x16
k-means tokens) plus overrides; the pixel row is ``experiment=tiny20_pixels aug=deit``. Runs go
to logs/train/runs/abl_<row>_s<seed>; a finished run (summary.json present) is skipped, so the
script resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from resumable_runs import OUT, run_once

BASE = ["experiment=tiny20_tokens", "aug.crop=14"]
RRC = [*BASE, "aug.rrc.enabled=true"]
EDA = [*RRC, "aug.eda.replace_prob=0.25", "aug.eda.swap_prob=0.25"]
NOISE = [*EDA, "aug.noise.prob=0.5"]
CUTMIX = [*NOISE, "aug.mix.cutmix_alpha=1.0"]


def rows(tokenadapt: str | None) -> dict[str, list[str]]:
    out = {"none": BASE, "rrc": RRC, "eda": EDA, "noise": NOISE, "cutmix": CUTMIX}
    ta = [*CUTMIX, f"aug.tokenadapt.checkpoint={tokenadapt}"] if tokenadapt else None
    if ta:
        out["tokenadapt"] = ta
    out["coloradapt"] = [*(ta or CUTMIX), "aug.color_adapt.prob=0.25"]
    out["pixels"] = ["experiment=tiny20_pixels", "aug=deit", "aug.crop=56"]
    return out


def run_dir(row: str, seed: int, tag: str = "abl") -> Path:
    return OUT / "logs" / "train" / "runs" / f"{tag}_{row}_s{seed}"


def report(names: list[str], seeds: list[int], tag: str = "abl") -> None:
    table = {}
    for row in names:
        accs = []
        for seed in seeds:
            f = run_dir(row, seed, tag) / "summary.json"
            if f.is_file():
                accs.append(100 * json.loads(f.read_text())["metrics"]["val/acc1"])
        table[row] = accs
    pixels = statistics.mean(table["pixels"]) if table.get("pixels") else None
    print("| row | top-1 per seed | mean ± std | / pixels |\n|---|---|---:|---:|")
    for row, accs in table.items():
        if not accs:
            continue
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ratio = f"{mean / pixels:.3f}" if pixels else "-"
        print(f"| {row} | {' / '.join(f'{a:.1f}' for a in accs)} | {mean:.1f} ± {std:.1f} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenadapt", default=None, help="a tokenadapt.safetensors for the TokenAdapt rows")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rows", default=None, help="comma-separated subset of the rows")
    parser.add_argument("--extra", nargs="*", default=[],
                        help="overrides for every row, e.g. trainer.max_epochs=100 optim.lr=1e-3 (use with --tag)")
    parser.add_argument("--tag", default="abl", help="run dir prefix: logs/train/runs/<tag>_<row>_s<seed>")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    table = rows(args.tokenadapt)
    names = args.rows.split(",") if args.rows else list(table)
    if args.report:
        report(names, seeds, args.tag)
        return
    for seed in seeds:
        for row in names:
            run_once([*table[row], *args.extra, f"seed={seed}"], run_dir(row, seed, args.tag))
    report(names, seeds, args.tag)


if __name__ == "__main__":
    main()
