"""Config helpers: custom resolvers and a readable dump of the resolved config."""

from __future__ import annotations

import os
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


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("wandb_mode"):
        OmegaConf.register_new_resolver("wandb_mode", wandb_mode)


def print_config(cfg: DictConfig) -> None:
    """Print the resolved config (without the hydra node); Hydra saves it in .hydra/ too."""
    body = OmegaConf.to_yaml({k: v for k, v in cfg.items() if k != "hydra"}, resolve=True)
    print(body, flush=True)
