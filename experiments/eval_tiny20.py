"""task=eval on tiny-imagenet-20: the supervised token and pixel classifiers of the same body, and an
MTM-pre-trained token encoder, scored by the frozen-feature evaluators, the corruption benchmark
and CamVid segmentation.

    python experiments/eval_tiny20.py                      # train what is missing, evaluate, report
    python experiments/eval_tiny20.py --tokens RUN/classifier.safetensors --pixels ... --mtm RUN/mtm.safetensors
    python experiments/eval_tiny20.py --report

Models (trained here when no path is given; runs under logs/<task>/runs/eval20_*):
  tokens  experiment=tiny20_tokens (micro ViT, 15 epochs)
  pixels  experiment=tiny20_pixels (the same body on 64 px pixels, 15 epochs)
  mtm     task=pretrain_mtm on the same tokens (experiments/mtm_tiny20.py's recipe), --mtm-epochs
Suites (one task=eval run each, logs/eval/runs/eval20_<model>_<suite>; finished runs are skipped):
  features      eval=[classify,knn,linear,fewshot] (classify for classifiers only)
  robustness    eval=[robustness] on --robust-images val images (class-balanced), 15 corruptions x 5 severities
  segmentation  eval=[segmentation] on CamVid, --seg-runs, --seg-epochs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from resumable_runs import OUT, run_once

EXPERIMENT = {"tokens": "experiment=tiny20_tokens", "pixels": "experiment=tiny20_pixels", "mtm": "experiment=tiny20_tokens"}
MTM = ["aug.crop=14", "model.embedding=learned", "optim.lr=1e-3", "task=pretrain_mtm", "aug.rrc.enabled=true",
       "aug.rrc.scale=[0.2,1.0]", "task.decoder.decoder_dim=128", "task.decoder.decoder_depth=2",
       "task.decoder.decoder_heads=4", "optim.betas=[0.9,0.95]", "scheduler.min_lr=0.0"]


def model_path(name: str, args) -> Path:
    given = getattr(args, name)
    if given:
        return Path(given)
    if name == "mtm":
        run = OUT / "logs" / "pretrain_mtm" / "runs" / "eval20_mtm_s0"
        run_once([EXPERIMENT[name], *MTM, f"trainer.max_epochs={args.mtm_epochs}"], run)
        return run / "mtm.safetensors"
    run = OUT / "logs" / "train" / "runs" / f"eval20_{name}_s0"
    run_once([EXPERIMENT[name]], run)
    return run / "classifier.safetensors"


def suites(name: str, args) -> dict[str, list[str]]:
    features = ["knn", "linear", "fewshot"] if name == "mtm" else ["classify", "knn", "linear", "fewshot"]
    out = {"features": [f"eval=[{','.join(features)}]"],
           "segmentation": ["eval=[segmentation]", f"eval.segmentation.runs=[{args.seg_runs}]",
                            f"eval.segmentation.epochs={args.seg_epochs}"]}
    if name != "mtm":  # corruption accuracy needs a classifier head
        out["robustness"] = ["eval=[robustness]", f"eval.robustness.max_images={args.robust_images}"]
    return out


def run_dir(name: str, suite: str) -> Path:
    return OUT / "logs" / "eval" / "runs" / f"eval20_{name}_{suite}"


def metrics(name: str, suite: str) -> dict:
    f = run_dir(name, suite) / "summary.json"
    return json.loads(f.read_text())["metrics"] if f.is_file() else {}


def report() -> None:
    cols = [("classify top-1", "features", "eval/classify/acc1"), ("k-NN top-1 (k=20)", "features", "eval/knn/acc1_k20"),
            ("linear top-1", "features", "eval/linear/acc1"), ("5-shot top-1", "features", "eval/fewshot/acc1_5shot"),
            ("clean top-1 (robustness set)", "robustness", "eval/robustness/clean_acc1"),
            ("mean corruption top-1", "robustness", "eval/robustness/mean_acc1"),
            ("relative robustness", "robustness", "eval/robustness/relative_robustness"),
            ("CamVid mIoU linear frozen", "segmentation", "eval/segmentation/miou/linear_frozen"),
            ("CamVid mIoU linear fine-tuned", "segmentation", "eval/segmentation/miou/linear_finetune"),
            ("CamVid mIoU decoder frozen", "segmentation", "eval/segmentation/miou/decoder_frozen"),
            ("CamVid mIoU decoder fine-tuned", "segmentation", "eval/segmentation/miou/decoder_finetune")]
    print("| model | " + " | ".join(c[0] for c in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name in EXPERIMENT:
        row = []
        for _, suite, key in cols:
            value = metrics(name, suite).get(key)
            row.append("—" if value is None else (f"{value:.3f}" if "relative" in key else f"{100 * value:.1f}"))
        print(f"| {name} | " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in EXPERIMENT:
        parser.add_argument(f"--{name}", default=None, help=f"the {name} model's checkpoint (default: train it)")
    parser.add_argument("--models", default="tokens,pixels,mtm")
    parser.add_argument("--suites", default="features,robustness,segmentation")
    parser.add_argument("--mtm-epochs", type=int, default=10)
    parser.add_argument("--robust-images", type=int, default=500, help="val images per corruption (class-balanced)")
    parser.add_argument("--seg-runs", default="linear_frozen,linear_finetune,decoder_frozen,decoder_finetune")
    parser.add_argument("--seg-epochs", type=int, default=5)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if not args.report:
        for name in args.models.split(","):
            checkpoint = model_path(name, args)
            for suite, overrides in suites(name, args).items():
                if suite in args.suites.split(","):
                    run_once(["task=eval", EXPERIMENT[name], f"task.checkpoint={checkpoint}", *overrides],
                             run_dir(name, suite))
    report()


if __name__ == "__main__":
    main()
