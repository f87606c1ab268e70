"""Config helpers: custom resolvers and a readable dump of the resolved config."""

from __future__ import annotations

import os
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


def run_id(run_name: str | None) -> str:
    """The run dir name: the user's run_name, else the start time and the SLURM job id.

    Under SLURM without a run_name the job id alone keys the dir, so that a requeued job (same
    id, later time) finds its own checkpoints again.
    """
    if run_name:
        return str(run_name)
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else time.strftime("%Y-%m-%d_%H-%M-%S") + "_local"


def multirun_group(mode, sweep_dir: str) -> str | None:
    """wandb group: one per multirun (the sweep dir name), none for single runs."""
    return Path(sweep_dir).name if str(mode).endswith("MULTIRUN") else None


def join(*parts) -> str:
    """Join the non-empty parts with '-', e.g. a readable wandb run name."""
    return "-".join(str(p) for p in parts if p not in (None, ""))


def vq_downsample(ch_mult) -> int:
    """A conv tokenizer with len(ch_mult) levels halves the resolution len-1 times."""
    return 2 ** (len(ch_mult) - 1)


RESOLVERS = {"vq_downsample": vq_downsample, "wandb_mode": wandb_mode, "run_id": run_id, "multirun_group": multirun_group, "join": join}


def register_resolvers() -> None:
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "run_id")


def print_config(cfg: DictConfig) -> None:
    """Print the resolved config (without the hydra node); Hydra saves it in .hydra/ too."""
    body = OmegaConf.to_yaml({k: v for k, v in cfg.items() if k != "hydra"}, resolve=True)
    print(body, flush=True)
