"""Training never hangs, never overwrites, never drops its history: SIGTERM, run dirs, resumed metrics."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_image_folder
from fork_server import FORK_SERVER, env
from run_helpers import final_lr, paths, resumable, run, synthetic
from signal_at import signal_at

pytestmark = pytest.mark.integration


@pytest.fixture
def long_run(tmp_path) -> list[str]:
    """A run of many short steps (36 train samples, batches of 4: 9 steps an epoch), printing every step."""
    images = make_image_folder(tmp_path / "images", classes=3, train=12, val=4)
    return [*synthetic(tmp_path, images), f"data.root={tmp_path}/ds", "trainer.max_epochs=200",
            "trainer.limit_train_batches=null", "data.batch_size=4", "callbacks.progress_bar.every=1",
            "callbacks.last_checkpoint.every_n_train_steps=3"]


def start(tmp: Path, *overrides: str, name: str = "proc") -> tuple[subprocess.Popen, Path, Path]:
    """run.py in the background, its stdout and stderr in files that the test reads while it runs."""
    out, err = tmp / f"{name}.out", tmp / f"{name}.err"
    proc = subprocess.Popen([FORK_SERVER.python(), "run.py", *overrides], cwd=REPO, env=env(), stdout=out.open("w"),
                            stderr=err.open("w"))
    return proc, out, err


def wait_until(proc: subprocess.Popen, done, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if proc.poll() is not None:
            raise AssertionError(f"run.py ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} within {timeout_s}s")
        time.sleep(0.05)


def ckpt_step(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["global_step"]
    except (OSError, RuntimeError, EOFError):  # not there yet, or being replaced
        return 0


def test_sigterm_saves_last_ckpt_exits_143_and_the_relaunch_resumes(tmp_path, long_run):
    proc, out, err = start(tmp_path, *long_run)
    wait_until(proc, lambda: " step 5 " in out.read_text(), "5 training steps")
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    proc.wait(timeout=60)
    stopped_in = time.monotonic() - t0
    assert stopped_in < 30 and proc.returncode == 143
    lines = [line for line in err.read_text().splitlines() if line.strip()]
    assert lines[-1].startswith("error: stopped by SIGTERM at step ") and "last.ckpt" in lines[-1]

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=True)["global_step"]  # complete and loadable
    assert step >= 5 and not (tmp_path / "run" / "summary.json").exists()

    proc = run(*long_run, f"trainer.max_steps={step + 3}")  # same run dir, ckpt_path=last by default
    assert f"resuming from {last}" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == step + 3 and summary["samples_seen"] == 3 * 4  # continued, not restarted


def train_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_kill9_then_resume_keeps_the_metric_history(tmp_path, long_run):
    common = [*long_run, "trainer.max_epochs=3"]  # 27 steps
    run(*common, f"hydra.run.dir={tmp_path}/ref")

    proc, _, _ = start(tmp_path, *common)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    wait_until(proc, lambda: ckpt_step(last) >= 12, "a checkpoint at step 12")
    proc.kill()  # SIGKILL: no clean-up of any kind
    proc.wait()
    killed_at = ckpt_step(last)
    assert killed_at < 27, "the run was not interrupted mid-way"
    before = train_steps(tmp_path / "run")
    assert before[:killed_at] == list(range(killed_at))  # every row up to the checkpoint was on disk

    run(*common)
    steps = train_steps(tmp_path / "run")
    assert steps == train_steps(tmp_path / "ref") == list(range(27))  # each step once, none lost
    for run_dir in (tmp_path / "ref", tmp_path / "run"):  # 3 colour classes: chance 1/3, measured 1.0
        assert json.loads((run_dir / "summary.json").read_text())["val/acc1"] >= 0.6
    assert validated_epochs(tmp_path / "run") == ["0", "1", "2"]


def test_resumes_from_an_epochs_last_batch_and_a_sigterm_while_restoring_end_where_an_uninterrupted_run_does(tmp_path):
    """Two gaps a SLURM requeue found (1353 steps for 1350): a SIGTERM during a resumed launch's
    restore was swallowed (training went on, then the grace timer killed it without a checkpoint),
    and a resume from a checkpoint at an epoch's last batch left Lightning's loop "mid epoch", so the
    next epoch's mid-epoch checkpoint read as a finished epoch and the resume after it replayed it.
    And a third: a kill during an epoch's validation resumed from the periodic checkpoint saved just
    before it, at the epoch's last batch, and the epoch was never validated."""
    images = make_image_folder(tmp_path / "images", classes=3, train=12, val=4)
    common = resumable(tmp_path, images, epochs=4)  # 36 steps, last.ckpt every 3
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    run(*common, f"hydra.run.dir={tmp_path}/ref")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"

    run(*common, *signal_at("on_validation_start", "SIGKILL", 9), check=False, **env)
    assert ckpt_step(last) == 6  # not step 9's, which Lightning saves before epoch 0's validation
    run(*common, *signal_at("on_train_batch_end", "SIGKILL", 19), check=False, **env)
    assert ckpt_step(last) == 18  # epoch 1's last batch
    restoring = run(*common, *signal_at("on_fit_start", "SIGTERM"), check=False, **env)
    assert restoring.returncode in (-signal.SIGTERM, 143), restoring.stderr[-2000:]  # stopped, not trained on
    assert ckpt_step(last) == 18 and not (tmp_path / "run" / "summary.json").exists()
    run(*common, *signal_at("on_train_batch_end", "SIGKILL", 22), check=False, **env)
    assert ckpt_step(last) == 21  # 3 batches into epoch 2
    run(*common)

    assert final_lr(tmp_path / "run") == final_lr(tmp_path / "ref")  # step 35 and its LR, not 3 steps more
    assert train_steps(tmp_path / "run") == train_steps(tmp_path / "ref") == list(range(36))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["global_step"] == 36
    assert validated_epochs(tmp_path / "run") == validated_epochs(tmp_path / "ref") == ["0", "1", "2", "3"]


def validated_epochs(run_dir: Path) -> list[str]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [r["epoch"] for r in csv.DictReader(f) if r.get("val/acc1")]


def test_unnamed_runs_started_together_get_their_own_dirs(tmp_path):
    """Both fail at once on a bad value, after Hydra made their dirs: in the same second."""
    procs = [start(tmp_path, *paths(tmp_path)[:2], "data.batch_size=0", name=f"p{i}")[0] for i in range(2)]
    for proc in procs:
        proc.wait(timeout=120)
    dirs = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(dirs) == 2 and all((d / ".hydra" / "config.yaml").is_file() for d in dirs)


def test_a_finished_named_run_is_reported_not_retrained(tmp_path):
    images = make_image_folder(tmp_path / "images")
    named = [o for o in synthetic(tmp_path, images) if not o.startswith("hydra.run.dir")]
    named += [f"data.root={tmp_path}/ds", "run_name=first"]
    run(*named)
    run_dir = tmp_path / "logs" / "train" / "runs" / "first"
    summary = (run_dir / "summary.json").read_text()
    assert json.loads(summary)["val/acc1"] >= 0.6  # chance 1/3, measured 1.0
    ckpt = (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns

    proc = run(*named)
    assert f"already finished: {run_dir / 'summary.json'}" in proc.stdout
    assert (run_dir / "summary.json").read_text() == summary
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns == ckpt
