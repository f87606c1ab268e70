"""The SLURM path against a real scheduler (munge, slurmctld, slurmd on this machine; slurm_cluster.py).

Skipped, with the reason, where the cluster cannot start (not root, no Debian packages).
"""

from __future__ import annotations

import csv
import json
import os
import time

import pytest
import torch

from conftest import make_image_folder
from run_helpers import final_lr, resumable, run, start, synthetic
from slurm_cluster import Unavailable, start_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except Unavailable as exc:
        pytest.skip(f"no SLURM cluster here: {exc}")
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # sbatch/squeue in run.py's submitit find it
    yield cluster
    cluster.stop()
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


def _local_slurm(tmp_path, cluster) -> str:
    """A conf/local/slurm.yaml as the README asks for (partition and time), in a search path of its own."""
    local = tmp_path / "conf" / "local"
    local.mkdir(parents=True)
    (local / "slurm.yaml").write_text(f"""# @package _global_
hydra:
  launcher:
    partition: {cluster.partition}
    timeout_min: 30
    cpus_per_task: 1
    mem_gb: 1
""")
    return f"hydra.searchpath=[file://{tmp_path / 'conf'}]"


def test_the_readme_sweep_runs_as_written_on_the_default_trainer(slurm, tmp_path):
    """README: python run.py -m hydra/launcher=submitit_slurm local=slurm ... with the default trainer
    (not distributed, accelerator auto): one task, one node, no GPU asked for; two jobs, two summaries."""
    images = make_image_folder(tmp_path / "images")
    run("-m", *synthetic(tmp_path, images), f"data.root={tmp_path}/ds", "hydra/launcher=submitit_slurm", "local=slurm",
        _local_slurm(tmp_path, slurm), f"hydra.sweep.dir={tmp_path}/sweep", "optim.lr=0.001,0.002")
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 2
    assert all(json.loads(p.read_text())["world_size"] == 1 for p in summaries)
    with open(tmp_path / "sweep" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["overrides"].split()[-1] for r in rows) == ["optim.lr=0.001", "optim.lr=0.002"]
    assert all(0.6 <= float(r["val/acc1"]) <= 1 for r in rows)  # 3 colour classes: chance 1/3, measured 1.0
    scripts = [p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*_submission.sh")]
    assert scripts and all("--ntasks-per-node=1" in s and "--nodes=1" in s and "gpus" not in s for s in scripts)
    assert all(f"--partition={slurm.partition}" in s for s in scripts)


def test_two_task_ddp_under_srun_counts_every_val_sample_once(slurm, tmp_path):
    """trainer=ddp with 2 CPU devices: one job of 2 srun tasks on the node; rank 0 alone writes the outputs."""
    images = make_image_folder(tmp_path / "images", classes=3, train=12, val=4)  # val: 12 samples in shards of 10 + 2
    run("-m", *synthetic(tmp_path, images), f"data.root={tmp_path}/ds", "hydra/launcher=submitit_slurm", "local=slurm",
        _local_slurm(tmp_path, slurm), f"hydra.sweep.dir={tmp_path}/sweep", "trainer=ddp", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.limit_val_batches=null", "seed=0")
    summaries = list((tmp_path / "sweep").rglob("summary.json"))
    assert len(summaries) == 1  # rank 0 only
    summary = json.loads(summaries[0].read_text())
    assert summary["world_size"] == 2 and summary["metrics"]["val/samples"] == 12
    assert summary["samples_seen_per_rank"][0] == summary["samples_seen_per_rank"][1]
    run_dir = summaries[0].parent
    assert len(list(run_dir.rglob("last.ckpt"))) == 1 and len(list(run_dir.rglob("metrics.csv"))) == 1
    script = next((tmp_path / "sweep" / ".submitit").rglob("*_submission.sh")).read_text()
    assert "--ntasks-per-node=2" in script and "gpus" not in script
    logs = sorted((tmp_path / "sweep" / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # one per srun task


def _job_ids(cluster) -> list[str]:
    return cluster.cmd("squeue", "-h", "-o", "%A").split()


def _start_requeued_now(cluster, job: str, timeout_s: float = 120) -> None:
    """SLURM holds a requeued batch job back for about two minutes (its begin time); start it soon."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _pending_after_a_run(cluster, job):
            _release(cluster, job, check=True)
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job} was not requeued within {timeout_s:.0f}s")


def test_usr2_mid_epoch_requeues_once_and_the_job_ends_where_an_uninterrupted_run_does(slurm, tmp_path):
    images = make_image_folder(tmp_path / "images", classes=3, train=12, val=4)
    common = resumable(tmp_path, images, epochs=20)
    total = 20 * 9
    run(*common, f"hydra.run.dir={tmp_path}/ref")

    launcher = start("-m", *common, "callbacks.last_checkpoint.every_n_train_steps=1000",  # epoch ends only
                     "hydra/launcher=submitit_slurm", "local=slurm", _local_slurm(tmp_path, slurm),
                     f"hydra.sweep.dir={tmp_path}/sweep", output=True)
    last = tmp_path / "sweep" / "0" / "checkpoints" / "last.ckpt"
    deadline, step = time.monotonic() + 300, 0
    while step < 9 and time.monotonic() < deadline and launcher.poll() is None:
        if last.is_file():
            step = torch.load(last, weights_only=True)["global_step"]
        time.sleep(0.05)
    jobs = _job_ids(slurm)
    assert len(jobs) == 1, jobs
    slurm.cmd("scancel", "--signal=USR2", jobs[0], check=True)
    _start_requeued_now(slurm, jobs[0])
    out, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, out[-3000:]
    assert 9 <= step < total  # signalled mid-run
    summary = json.loads((tmp_path / "sweep" / "0" / "summary.json").read_text())
    assert summary["global_step"] == total
    ref_step, ref_lr = final_lr(tmp_path / "ref")
    got_step, got_lr = final_lr(tmp_path / "sweep" / "0")
    assert got_step == ref_step and got_lr == pytest.approx(ref_lr, rel=1e-6)
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert abs(summary["val/acc1"] - ref["val/acc1"]) <= 0.2  # measured 1.0 and 1.0
    show = slurm.cmd("scontrol", "show", "job", jobs[0])
    assert "Restarts=1" in show, show  # one signal, one requeue (submitit's), not two
    first, second = summary["segments"]  # the summary's times add up over the requeue
    assert (first["slurm_job_id"], first["slurm_restart"]) == (jobs[0], 0) and second["slurm_restart"] == 1
    assert first["steps"][1] >= 9 and second["steps"] == [first["steps"][1], total]  # resumed where it stopped
    log = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob("*/*_log.*"))
    assert f"stopped by the requeue signal at step {first['steps'][1]}; saved {last}" in log  # not an epoch's end
    assert summary["wall_s"] == pytest.approx(first["wall_s"] + second["wall_s"], abs=2e-3)
    assert first["wall_s"] > 0 and summary["launch_wall_s"] == second["wall_s"]


def test_a_job_reaching_its_time_limit_is_requeued_and_finishes(slurm, tmp_path):
    """--time=2 with the USR2 warning 60 s before it: submitit requeues the job each time, and the
    run goes on from last.ckpt until its 50 s training budget is spent (more than any one launch can
    train, on a machine of any speed); the summary lists every launch. slurmctld sends the warning
    at its first periodic check (every 30 s) past end - delay - 30 s, so here 30-60 s into a launch,
    after run.py's start-up. (With --time=1 and a 30 s delay that check can fall at the very start,
    before submitit's handler exists: the job then dies of USR2 and is not requeued; seen once.)"""
    images = make_image_folder(tmp_path / "images", classes=3, train=12, val=4)
    launcher = start("-m", *resumable(tmp_path, images, epochs=100_000), "trainer.max_time=50",
                     "callbacks.last_checkpoint.every_n_train_steps=20", "hydra/launcher=submitit_slurm",
                     "local=slurm", _local_slurm(tmp_path, slurm), "hydra.launcher.timeout_min=2",
                     "hydra.launcher.signal_delay_s=60", f"hydra.sweep.dir={tmp_path}/sweep", output=True)
    deadline, requeues, released_at = time.monotonic() + 600, 0, 0.0
    while launcher.poll() is None and time.monotonic() < deadline:
        jobs = _job_ids(slurm)
        if jobs and time.monotonic() - released_at > 10 and _pending_after_a_run(slurm, jobs[0]):
            _release(slurm, jobs[0])
            requeues, released_at = requeues + 1, time.monotonic()
        time.sleep(0.5)
    if launcher.poll() is None:  # past the deadline: do not leave the launcher running after the test
        launcher.kill()
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 0, out[-3000:]
    summary = json.loads((tmp_path / "sweep" / "0" / "summary.json").read_text())
    assert summary["budget"]["stopped_by_budget"] and summary["budget"]["train_seconds"] >= 50
    segments = [s for s in summary["segments"] if s["steps"][1] > s["steps"][0]]  # launches that trained
    assert len(segments) >= 2 and requeues >= 1
    assert [s["slurm_restart"] for s in summary["segments"]] == sorted({s["slurm_restart"] for s in summary["segments"]})
    assert all(a["steps"][1] == b["steps"][0] for a, b in zip(segments, segments[1:]))  # each goes on from the last
    assert segments[-1]["steps"][1] == summary["global_step"]
    assert all(s["wall_s"] < 120 for s in summary["segments"][:-1])  # each ended at the warning, inside its limit


def _release(cluster, job: str, check: bool = False) -> None:
    """Start a requeued job now instead of in SLURM's two minutes, but 2 s after its requeue: slurmd
    refuses a launch in the same second as the requeue revoked the job's credential ("Killing
    non-startable batch job: Job credential revoked"), and the job then ends as failed (seen once).
    (A begin time of now+3 s waits for the next backfill cycle instead, up to a minute.)"""
    time.sleep(2)
    cluster.cmd("scontrol", "update", f"JobId={job}", "StartTime=now", check=check)


def _pending_after_a_run(cluster, job: str) -> bool:
    """The job is pending again after it ran (requeued), held back by SLURM's begin time."""
    out = cluster.cmd("squeue", "-h", "-j", job, "-o", "%T %r")
    return out.startswith("PENDING") and "BeginTime" in out


@pytest.mark.parametrize("override, message", [
    ("hydra.launcher.partition=nosuch", "hydra.launcher.partition=nosuch: the cluster has no such partition (it has: cpu)"),
    ("trainer.accelerator=gpu", "hydra.launcher.gpus_per_node=1: partition cpu has no GPUs"),
    ("hydra.launcher.cpus_per_task=64", "asks for 64 CPUs per node, but the nodes of partition cpu have"),
])
def test_a_misconfigured_launcher_is_refused_by_key_before_submitting(slurm, tmp_path, override, message):
    images = make_image_folder(tmp_path / "images")
    before = set(_job_ids(slurm))  # an earlier test's job may still be completing
    proc = run("-m", *synthetic(tmp_path, images), f"data.root={tmp_path}/ds", "hydra/launcher=submitit_slurm",
               "local=slurm", _local_slurm(tmp_path, slurm), f"hydra.sweep.dir={tmp_path}/sweep", override, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]  # the error line (Hydra's own warnings may come before it)
    assert last.startswith("error: ") and message in last, proc.stderr[-2000:]
    assert not set(_job_ids(slurm)) - before and not list((tmp_path / "sweep").glob("*/summary.json"))
