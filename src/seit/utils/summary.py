"""summary.json: the one file every run leaves behind, and that sweeps aggregate."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from seit.utils.io import atomic_write_json

log = logging.getLogger(__name__)


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
    try:
        atomic_write_json(path, summary)
    except OSError as e:  # a full disk: the OS error names no file
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    return path


def finished_run(output_dir: str | Path, cfg: DictConfig) -> dict | None:
    """The summary of a run that already finished in ``output_dir``, reported; None if there is none.

    summary.json is written last, so its presence means the run is done. Relaunching it (a requeue
    after the end, a repeated command) must neither train over it nor replace its summary with one
    of an empty resume, so the caller returns this summary and trains nothing. Only a summary of the
    same task counts: each task has its own dirs, and one shared on purpose (hydra.run.dir) is the
    user's choice.
    """
    path = Path(output_dir) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("task") != cfg.task.name:
        return None
    if summary.get("config_hash") != config_hash(cfg):
        log.warning("%s was written with another config (hash %s, now %s)", path, summary.get("config_hash"),
                    config_hash(cfg))
    print(f"already finished: {path} (step {summary.get('global_step')}); nothing trained. A new run_name "
          "(or hydra.run.dir) starts a new run; ckpt_path=<its last.ckpt> continues from it", flush=True)
    return summary
