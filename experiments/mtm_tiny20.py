"""Does MTM pre-training pay on tiny-imagenet-20 tokens? Pre-train + fine-tune against training the
same model from scratch for the same total epochs, and linear probes of the MTM encoder against a
randomly initialised one, for each seed.

    python experiments/mtm_tiny20.py                     # runs what is missing, then the table
    python experiments/mtm_tiny20.py --report

Every run is ``run.py experiment=tiny20_tokens`` (micro ViT, k-means tokens, 14x14 crops of the
16x16 grid) with the learned id embedding and k2 s2 stem (``model.embedding=learned``) and lr 1e-3:
  mtm      task=pretrain_mtm for --pretrain epochs (Token-RRC scale 0.2-1, decoder 128 wide x 2)
  finetune model.pretrained=<mtm export>, --finetune epochs, layer decay 0.75
  scratch  the same classifier from random init for --pretrain + --finetune epochs
  probe_mtm / probe_random  task.linear_probe=true for --probe epochs
Runs go to logs/<task>/runs/mtm20_<row>_s<seed>; finished runs (summary.json) are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from resumable_runs import OUT, run_once

BASE = ["experiment=tiny20_tokens", "aug.crop=14", "model.embedding=learned", "optim.lr=1e-3"]
TASK_DIR = {"mtm": "pretrain_mtm"}


PRETRAINED_ROWS = ("mtm", "finetune", "probe_mtm")  # what --soft-tau changes; the baselines are shared


def run_dir(row: str, seed: int, soft_tau: float = 0.0) -> Path:
    prefix = f"mtm20soft{soft_tau:g}" if soft_tau and row in PRETRAINED_ROWS else "mtm20"
    return OUT / "logs" / TASK_DIR.get(row, "train") / "runs" / f"{prefix}_{row}_s{seed}"


def rows(seed: int, args) -> dict[str, list[str]]:
    export = run_dir("mtm", seed, args.soft_tau) / "mtm.safetensors"
    probe = [*BASE, "task.linear_probe=true", "model.token_dropout=0.0", f"trainer.max_epochs={args.probe}",
             "optim.weight_decay=0.0"]
    return {
        "mtm": [*BASE, "task=pretrain_mtm", "aug.rrc.enabled=true", "aug.rrc.scale=[0.2,1.0]",
                "task.decoder.decoder_dim=128", "task.decoder.decoder_depth=2", "task.decoder.decoder_heads=4",
                "optim.betas=[0.9,0.95]", "scheduler.min_lr=0.0", f"trainer.max_epochs={args.pretrain}",
                f"task.soft_tau={args.soft_tau}"],
        "finetune": [*BASE, f"model.pretrained={export}", "optim.layer_decay=0.75",
                     f"trainer.max_epochs={args.finetune}"],
        "scratch": [*BASE, f"trainer.max_epochs={args.pretrain + args.finetune}"],
        "probe_mtm": [*probe, f"model.pretrained={export}"],
        "probe_random": probe,
    }


def top1(row: str, seed: int, soft_tau: float = 0.0) -> float | None:
    f = run_dir(row, seed, soft_tau) / "summary.json"
    if not f.is_file():
        return None
    m = json.loads(f.read_text())["metrics"]
    return 100 * m["val/mtm_acc" if row == "mtm" else "val/acc1"]


def report(seeds: list[int], args) -> None:
    print("| row | per seed | mean ± std |\n|---|---|---:|")
    for row in rows(0, args):
        vals = [v for v in (top1(row, s, args.soft_tau) for s in seeds) if v is not None]
        if vals:
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            name = "mtm (masked-token acc.)" if row == "mtm" else row
            print(f"| {name} | {' / '.join(f'{v:.1f}' for v in vals)} | {statistics.mean(vals):.1f} ± {std:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--pretrain", type=int, default=20)
    parser.add_argument("--finetune", type=int, default=10)
    parser.add_argument("--probe", type=int, default=10)
    parser.add_argument("--soft-tau", type=float, default=0.0,
                        help="> 0: MTM with soft targets (task.soft_tau); runs mtm20soft<tau>_*, baselines shared")
    parser.add_argument("--rows", default=None, help="comma-separated subset of the rows to run")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.report:
        for seed in seeds:
            for row, overrides in rows(seed, args).items():
                if args.rows is None or row in args.rows.split(","):
                    run_once([*overrides, f"seed={seed}"], run_dir(row, seed, args.soft_tau))
    report(seeds, args)


if __name__ == "__main__":
    main()
