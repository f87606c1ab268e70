"""The SLURM path against a real scheduler (munge, slurmctld, slurmd on this machine; slurm_cluster.py).

Skipped, with the reason, where the cluster cannot start (not root, no Debian packages).
"""

from __future__ import annotations

import csv
import json
import os

import pytest

from conftest import make_image_folder
from run_helpers import run, synthetic
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
