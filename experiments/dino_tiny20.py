"""DINOv2 on tiny-imagenet-20 tokens: is it a better backbone than MTM or a random network at the same
pre-training budget, and does distillation beat training the small student from scratch?

    python experiments/dino_tiny20.py                   # runs what is missing (two at a time), then the tables
    python experiments/dino_tiny20.py --report

Every backbone is scored by the same code, ``task=eval eval=[knn,linear,fewshot]`` (weighted k-NN
k=20 T=0.07, the linear-probe grid, 5-shot), on the 1,000 val images. Rows, per seed:
  dino      experiment=dino_tokens (micro ViT + class token, 2 x 14x14 global + 4 x 6x6 local crops)
  mtm       experiments/mtm_tiny20.py's MTM recipe (micro ViT, learned id embedding)
  random    the dino_tokens network at init (one step at lr 1e-12, so the run writes its export)
  distill   experiment=distill_tokens: the --teacher row of the same seed (default mtm: the better
            backbone of the two at this budget; its features through fresh frozen heads), into the nano ViT
  scratch   the nano ViT with the same objective (experiment=dino_tokens model=nano) from scratch
dino and mtm get --budget seconds of training (``trainer.max_time``, schedules over the budget:
``scheduler.horizon=budget``); distill and scratch get --student-budget.
Runs go to logs/<task>/runs/dino20_<row>_s<seed>; finished runs (summary.json) are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from resumable_runs import OUT, run_once

MTM = ["experiment=tiny20_tokens", "aug.crop=14", "model.embedding=learned", "optim.lr=1e-3", "task=pretrain_mtm",
       "aug.rrc.enabled=true", "aug.rrc.scale=[0.2,1.0]", "task.decoder.decoder_dim=128", "task.decoder.decoder_depth=2",
       "task.decoder.decoder_heads=4", "optim.betas=[0.9,0.95]", "scheduler.min_lr=0.0"]
TASK_DIR = {"dino": "pretrain_dino", "mtm": "pretrain_mtm", "random": "pretrain_dino", "distill": "distill",
            "scratch": "pretrain_dino"}
EXPORT = {"mtm": "mtm.safetensors"}
PRETRAIN = ("dino", "mtm", "random")
EVAL = ["experiment=tiny20_tokens", "task=eval", "eval=[knn,linear,fewshot]"]
COLUMNS = (("k-NN top-1 (k=20)", "eval/knn/acc1_k20"), ("linear top-1", "eval/linear/acc1"),
           ("5-shot top-1", "eval/fewshot/acc1_5shot"))


def hms(seconds: int) -> str:
    return f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_dir(row: str, seed: int) -> Path:
    return OUT / "logs" / TASK_DIR[row] / "runs" / f"dino20_{row}_s{seed}"


def export(row: str, seed: int) -> Path:
    return run_dir(row, seed) / EXPORT.get(row, "dino.safetensors")


def eval_dir(row: str, seed: int) -> Path:
    return OUT / "logs" / "eval" / "runs" / f"dino20_{row}_s{seed}"


def overrides(row: str, seed: int, args) -> list[str]:
    budget = [f"trainer.max_time={hms(args.budget)}", "scheduler.horizon=budget", "trainer.max_epochs=1000"]
    student = [f"trainer.max_time={hms(args.student_budget)}", "scheduler.horizon=budget", "trainer.max_epochs=1000"]
    rows = {
        "dino": ["experiment=dino_tokens", *budget],
        "mtm": [*MTM, *budget],
        "random": ["experiment=dino_tokens", "trainer.max_epochs=1", "trainer.max_steps=1", "optim.lr=1e-12"],
        "distill": ["experiment=distill_tokens", f"task.teacher.checkpoint={export(args.teacher, seed)}", *student],
        "scratch": ["experiment=dino_tokens", "model=nano", *student],
    }
    return [*rows[row], f"seed={seed}"]


def jobs(args) -> list[list[tuple[list[str], Path]]]:
    """Three waves: pre-training, the students (distilled and scratch of one seed side by side, so they
    share the machine alike), evaluation."""
    seeds = [int(s) for s in args.seeds.split(",")]
    pretrain = [(overrides(r, s, args), run_dir(r, s)) for r in PRETRAIN for s in seeds]
    distill = [(overrides(r, s, args), run_dir(r, s)) for s in seeds for r in ("distill", "scratch")]
    evals = [([*EVAL, f"task.checkpoint={export(r, s)}", f"seed={s}"], eval_dir(r, s))
             for r in ("dino", "mtm", "random", "distill", "scratch") for s in seeds]
    return [pretrain, distill, evals]


def metrics(row: str, seed: int) -> dict:
    f = eval_dir(row, seed) / "summary.json"
    return json.loads(f.read_text())["metrics"] if f.is_file() else {}


def cell(values: list[float]) -> str:
    if not values:
        return "—"
    per_seed = " / ".join(f"{100 * v:.1f}" for v in values)
    if len(values) < 2:
        return per_seed
    return f"{per_seed} ({100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f})"


def report(args) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    names = {"dino": "DINO on tokens (micro)", "mtm": "MTM on tokens (micro)", "random": "random init (micro)",
             "distill": "nano, distilled from the --teacher row", "scratch": "nano, DINO from scratch"}
    print("| backbone | " + " | ".join(c[0] for c in COLUMNS) + " | training: seconds, steps per seed |")
    print("|---|" + "---:|" * (len(COLUMNS) + 1))
    for row, name in names.items():
        cells = [cell([metrics(row, s)[key] for s in seeds if key in metrics(row, s)]) for _, key in COLUMNS]
        runs = [json.loads((run_dir(row, s) / "summary.json").read_text()) for s in seeds
                if (run_dir(row, s) / "summary.json").is_file()]
        cost = " / ".join(f"{r['budget']['train_seconds']:.0f} s, {r['global_step']}" for r in runs)
        print(f"| {name} | " + " | ".join(cells) + f" | {cost} |")
    knn = {row: [metrics(row, s).get("eval/knn/acc1_k20") for s in seeds] for row in ("distill", "scratch")}
    if all(v is not None for vs in knn.values() for v in vs):
        gap = 100 * (statistics.mean(knn["distill"]) - statistics.mean(knn["scratch"]))
        print(f"\ndistilled - scratch, k-NN top-1: {gap:+.1f} pp (target: >= +2 pp)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--budget", type=int, default=900, help="training seconds of each dino / mtm run")
    parser.add_argument("--student-budget", type=int, default=600, help="training seconds of each distill / scratch run")
    parser.add_argument("--teacher", default="mtm", choices=("dino", "mtm"), help="the distillation teacher's row")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if not args.report:
        for wave in jobs(args):
            with ThreadPoolExecutor(args.parallel) as pool:
                list(pool.map(lambda job: run_once(*job), wave))
    report(args)


if __name__ == "__main__":
    main()
