"""The SLURM launcher's checks against sinfo's partitions (seit.utils.slurm), without a cluster."""

import pytest

from seit.utils.slurm import SlurmConfigError, check_launcher

PARTS = {"cpu": {"default": True, "cpus": 32, "gres": set()}, "gpu": {"default": False, "cpus": 96, "gres": {"gpu"}}}


def test_what_the_cluster_can_run_passes():
    check_launcher({"partition": None, "tasks_per_node": 1, "cpus_per_task": 8, "gpus_per_node": None}, PARTS)
    check_launcher({"partition": "gpu", "tasks_per_node": 8, "cpus_per_task": 12, "gpus_per_node": 8}, PARTS)
    check_launcher({"partition": "anything"}, {})  # no sinfo here: nothing to check against


@pytest.mark.parametrize("launcher, message", [
    ({"partition": "big"}, r"hydra.launcher.partition=big: the cluster has no such partition \(it has: cpu, gpu\)"),
    ({"partition": "cpu", "gpus_per_node": 2}, "hydra.launcher.gpus_per_node=2: partition cpu has no GPUs"),
    ({"partition": None, "gpus_per_node": 1}, "partition cpu has no GPUs"),  # the default partition
    ({"partition": "gpu", "tasks_per_node": 8, "cpus_per_task": 16},
     "tasks_per_node=8 x cpus_per_task=16 asks for 128 CPUs per node, but the nodes of partition gpu have 96"),
])
def test_what_it_cannot_run_is_named_by_key(launcher, message):
    with pytest.raises(SlurmConfigError, match=message):
        check_launcher(launcher, PARTS)


def test_no_partition_and_no_default_is_named():
    with pytest.raises(SlurmConfigError, match="hydra.launcher.partition is not set and the cluster has no default"):
        check_launcher({"partition": None}, {"a": {"default": False, "cpus": 4, "gres": set()}})
