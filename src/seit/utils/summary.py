"""summary.json: the one file every run leaves behind, and that sweeps aggregate."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from seit.utils.io import atomic_write_json


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved config (without the hydra node), for grouping identical runs."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]


def to_float(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def write_summary(output_dir: str | Path, summary: dict) -> Path:
    path = Path(output_dir) / "summary.json"
    atomic_write_json(path, summary)
    return path
