"""Config helpers: custom resolvers and a readable dump of the resolved config."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def wandb_mode() -> str:
    """``online`` when the user is logged in to wandb (API key or netrc entry), else ``offline``.

    An explicit ``WANDB_MODE`` always wins (tests use ``disabled``).
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if "api.wandb.ai" in netrc.read_text() else "offline"
    except OSError:
        return "offline"


def run_dir(parent: str, run_name: str | None) -> str:
    """A single run's output dir under ``parent``: ``run_name``, else the job's id, else a new dir.

    A named run (or a SLURM job, or a torchrun job with a rendezvous id, whose id stays the same
    when it is requeued or restarted) comes back to its dir and resumes there from last.ckpt. An
    unnamed run gets a dir nobody else has (see ``new_dir``), so it never resumes, and never
    overwrites, another run.
    """
    if run_name:
        return f"{parent}/{run_name}"
    job = shared_job_id()
    return f"{parent}/{job}" if job else new_dir(parent)


def shared_job_id() -> str | None:
    """The id that every process of one job sees (and a requeued job sees again), if any."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return f"torchrun-{rdzv}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("several processes without a shared job id would each pick their own output dir: "
                         "set run_name (or launch with torchrun --rdzv-id / --standalone)")
    return None


def new_dir(parent: str) -> str:
    """Create and return ``parent/<date>_<time>_<random>``; the exclusive mkdir makes a clash impossible."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    while True:
        path = Path(parent) / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"
        try:
            path.mkdir()
            return str(path)
        except FileExistsError:
            continue


def multirun_group(mode, sweep_dir: str) -> str | None:
    """wandb group: one per multirun (the sweep dir name), none for single runs."""
    return Path(sweep_dir).name if str(mode).endswith("MULTIRUN") else None


def join(*parts) -> str:
    """Join the non-empty parts with '-', e.g. a readable wandb run name."""
    return "-".join(str(p) for p in parts if p not in (None, ""))


def vq_downsample(ch_mult) -> int:
    """A conv tokenizer with len(ch_mult) levels halves the resolution len-1 times."""
    return 2 ** (len(ch_mult) - 1)


def slurm_layout(what: str, trainer) -> int | None:
    """A SLURM launcher's ``nodes``, ``tasks_per_node`` or ``gpus_per_node`` for a trainer config.

    A distributed trainer (a ``ddp`` strategy) runs ``devices`` tasks on each of ``num_nodes``
    nodes, one per device, as Lightning's SLURM environment expects; any other trainer is one task
    on one node. GPUs are asked for only when ``accelerator`` is ``gpu``/``cuda``, one per task (else
    None: the batch script then names no GPUs at all, which every partition accepts).
    Raises ValueError (naming the key) when the tasks cannot be counted (``devices=auto`` or -1).
    """
    distributed = "ddp" in str(trainer.get("strategy") or "")
    if what == "nodes":
        return int(trainer.get("num_nodes") or 1) if distributed else 1
    devices = trainer.get("devices", 1)
    if not distributed:
        tasks = 1
    elif isinstance(devices, int) and devices > 0:
        tasks = devices
    elif isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
        tasks = int(devices)
    elif OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        tasks = len(devices)
    else:
        raise ValueError(f"trainer.devices={devices}: a SLURM job runs one task per device and needs their number; "
                         "set trainer.devices=N")
    if what == "tasks_per_node":
        return tasks
    if what == "gpus_per_node":
        return tasks if str(trainer.get("accelerator")) in ("gpu", "cuda") else None
    raise ValueError(f"slurm_layout: unknown field {what!r}")


RESOLVERS = {"vq_downsample": vq_downsample, "slurm_layout": slurm_layout, "wandb_mode": wandb_mode,
             "run_dir": run_dir, "new_dir": new_dir, "multirun_group": multirun_group, "join": join}
CACHED = ("run_dir", "new_dir")  # resolved once per config: a second look must not make another dir


def register_resolvers() -> None:
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=name in CACHED)


def print_config(cfg: DictConfig) -> None:
    """Print the resolved config (without the hydra node); Hydra saves it in .hydra/ too."""
    body = OmegaConf.to_yaml({k: v for k, v in cfg.items() if k != "hydra"}, resolve=True)
    print(body, flush=True)
