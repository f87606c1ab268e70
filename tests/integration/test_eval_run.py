"""task=eval through run.py: a trained classifier scored by classify, knn, linear and fewshot from
its export, the same score from its .ckpt, and bad inputs refused in one line."""

from __future__ import annotations

import json

from conftest import make_image_folder
from run_helpers import paths, run, synthetic


def test_eval_scores_a_trained_classifier_with_every_feature_evaluator(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=3, train=12, val=6)
    base = [*synthetic(tmp_path, images), f"data.root={tmp_path}/ds"]
    run(*base)
    trained = json.loads((tmp_path / "run" / "summary.json").read_text())
    export = trained["classifier_export"]

    out = tmp_path / "eval"
    run(*base, "task=eval", f"task.checkpoint={export}", "eval=[classify,knn,linear,fewshot]", f"hydra.run.dir={out}",
        "eval.linear.epochs=5", "eval.linear.lrs=[0.1]", "eval.fewshot.shots=[1,2]", "eval.fewshot.draws=2",
        "eval.knn.ks=[3]")
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert summary["task"] == "eval" and summary["model"]["kind"] == "classifier"
    # the export scores the val split exactly as the training run's own validation did
    assert abs(m["eval/classify/acc1"] - trained["val/acc1"]) < 1e-6
    assert m["eval/classify/samples"] == 18
    for key in ("eval/knn/acc1_k3", "eval/linear/acc1", "eval/fewshot/acc1_2shot"):
        assert 0.0 <= m[key] <= 1.0
    assert m["eval/knn/acc1_k3"] >= 0.6  # 3 flat-colour classes: chance 1/3
    report = (out / "eval.md").read_text()
    assert "## classify" in report and "## linear" in report and "per-class accuracy" in report
    assert (out / "classify" / "confusion_val.csv").read_text().count("\n") == 4
    assert (out / "features" / "train.npz").is_file()  # computed once, shared by knn, linear and fewshot

    # the same command again computes nothing; other evaluators into the same dir are refused
    again = run(*base, "task=eval", f"task.checkpoint={export}", "eval=[classify,knn,linear,fewshot]",
                f"hydra.run.dir={out}", "eval.linear.epochs=5", "eval.linear.lrs=[0.1]", "eval.fewshot.shots=[1,2]",
                "eval.fewshot.draws=2", "eval.knn.ks=[3]")
    assert "already evaluated:" in again.stdout
    proc = run(*base, "task=eval", f"task.checkpoint={export}", "eval=[classify]", f"hydra.run.dir={out}", check=False)
    assert proc.returncode != 0 and "already holds the results of another run" in proc.stderr

    # the Lightning checkpoint gives the same score as its export
    out2 = tmp_path / "eval_ckpt"
    run(*base, "task=eval", f"task.checkpoint={trained['last_ckpt_path']}", "eval=[classify]", f"hydra.run.dir={out2}")
    again = json.loads((out2 / "summary.json").read_text())["metrics"]
    assert again["eval/classify/acc1"] == m["eval/classify/acc1"]

    # refused in one line: no evaluator, a token model on image data, a file that is no checkpoint
    proc = run(*base, "task=eval", f"task.checkpoint={export}", f"hydra.run.dir={tmp_path}/e1", check=False)
    assert proc.returncode != 0 and "task=eval needs evaluators: eval=[" in proc.stderr
    proc = run(*paths(tmp_path), "task=eval", f"task.checkpoint={export}", "eval=[classify]", "data=images",
               f"data.source={images}", f"hydra.run.dir={tmp_path}/e2", check=False)
    assert proc.returncode != 0 and "is a token model; it scores a token dataset" in proc.stderr
    proc = run(*base, "task=eval", f"task.checkpoint={export}", "eval=[knn]", "eval.knn.temperature=-1",
               f"hydra.run.dir={tmp_path}/e4", check=False)
    assert proc.returncode != 0 and "error: eval.knn.temperature=-1 must be > 0" in proc.stderr
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    proc = run(*base, "task=eval", f"task.checkpoint={junk}", "eval=[classify]", f"hydra.run.dir={tmp_path}/e3",
               check=False)
    assert proc.returncode != 0 and str(junk) in proc.stderr and "Traceback" not in proc.stderr
