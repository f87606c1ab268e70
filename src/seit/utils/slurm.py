"""Check a SLURM sweep against the cluster before submitting it (``hydra/launcher=submitit_slurm``).

A job that asks for a partition that does not exist, for GPUs on a partition without any, or for
more CPUs per node than its nodes have is refused by sbatch with a message about the script, or
worse, pends forever. ``check_launcher`` asks ``sinfo`` first and names the launcher key instead; the
launcher ``hydra_plugins.seit_slurm.CheckedSlurmLauncher`` calls it before it submits.
"""

from __future__ import annotations

import shutil
import subprocess

from collections.abc import Mapping


class SlurmConfigError(ValueError):
    """A launcher setting the cluster cannot satisfy; the message names the key."""


def partitions() -> dict[str, dict]:
    """``sinfo``'s partitions: name -> {"default", "cpus" (per node, the largest), "gres" (set of GRES
    names such as gpu)}. Empty when sinfo is not there."""
    if not shutil.which("sinfo"):
        return {}
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%G"], capture_output=True, text=True, timeout=30)
    if out.returncode:
        raise SlurmConfigError(f"sinfo failed: {out.stderr.strip() or out.stdout.strip()}")
    parts: dict[str, dict] = {}
    for line in out.stdout.splitlines():
        name, cpus, gres = line.split("|")
        default = name.endswith("*")
        part = parts.setdefault(name.rstrip("*"), {"default": default, "cpus": 0, "gres": set()})
        part["cpus"] = max(part["cpus"], int(cpus.rstrip("+")))
        part["gres"] |= {g.split(":")[0] for g in gres.split(",") if g and g != "(null)"}
    return parts


def check_launcher(launcher: Mapping, parts: dict[str, dict]) -> None:
    """Raise SlurmConfigError (one line, the key named) for what ``parts`` cannot run."""
    if not parts:
        return
    name = launcher.get("partition")
    if name is None:
        name = next((p for p, v in parts.items() if v["default"]), None)
        if name is None:
            raise SlurmConfigError("hydra.launcher.partition is not set and the cluster has no default partition: "
                                   f"set it in conf/local/slurm.yaml (partitions: {', '.join(sorted(parts))})")
    elif name not in parts:
        raise SlurmConfigError(f"hydra.launcher.partition={name}: the cluster has no such partition "
                               f"(it has: {', '.join(sorted(parts))})")
    part = parts[name]
    gpus = launcher.get("gpus_per_node") or launcher.get("gpus_per_task") or 0
    if gpus and "gpu" not in part["gres"]:
        raise SlurmConfigError(f"hydra.launcher.gpus_per_node={gpus}: partition {name} has no GPUs (GRES: "
                               f"{', '.join(sorted(part['gres'])) or 'none'}); train with trainer.accelerator=cpu "
                               "there, or pick a GPU partition")
    cpus = int(launcher.get("tasks_per_node") or 1) * int(launcher.get("cpus_per_task") or 1)
    if part["cpus"] and cpus > part["cpus"]:
        raise SlurmConfigError(f"hydra.launcher.tasks_per_node={launcher.get('tasks_per_node')} x cpus_per_task="
                               f"{launcher.get('cpus_per_task')} asks for {cpus} CPUs per node, but the nodes of "
                               f"partition {name} have {part['cpus']}; lower hydra.launcher.cpus_per_task")
