"""seit's SLURM launcher: hydra-submitit's ``SlurmLauncher`` that checks its settings against ``sinfo``
before it submits (``seit.utils.slurm.check_launcher``). Hydra takes launchers only from the
``hydra_plugins`` package, hence this module; ``conf/hydra/launcher/submitit_slurm.yaml`` names it.
"""

from __future__ import annotations

try:  # the `slurm` extra; Hydra imports every hydra_plugins module at start, with or without it
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # pragma: no cover - without the extra there is nothing to check
    SlurmLauncher = None

if SlurmLauncher is not None:
    from seit.utils.slurm import check_launcher, partitions

    class CheckedSlurmLauncher(SlurmLauncher):
        """Refuses, naming the key, what the cluster cannot run: an unknown partition, GPUs on a
        partition without any, more CPUs per node than its nodes have."""

        def launch(self, job_overrides, initial_job_idx):
            check_launcher(self.params, partitions())
            return super().launch(job_overrides, initial_job_idx)
