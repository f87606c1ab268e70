"""Multirun aggregation: one table built from the jobs' summary.json files."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
COLUMNS = ("val/acc1", "val/acc5", "val/loss", "wall_s", "samples_per_s", "global_step")


def aggregate(sweep_dir: str | Path) -> list[dict]:
    """Rows of (job, overrides, metrics) for every job dir holding a summary.json."""
    rows = []
    for path in sorted(Path(sweep_dir).glob("*/summary.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        summary = json.loads(path.read_text())
        overrides_file = path.parent / ".hydra" / "overrides.yaml"
        overrides = ""
        if overrides_file.is_file():
            overrides = " ".join(l[2:].strip() for l in overrides_file.read_text().splitlines() if l.startswith("- "))
        rows.append({"job": path.parent.name, "overrides": overrides, **{c: summary.get(c) for c in COLUMNS},
                     "config_hash": summary.get("config_hash")})
    return rows


def write_tables(sweep_dir: str | Path, rows: list[dict]) -> None:
    sweep_dir = Path(sweep_dir)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(fmt(v) for v in row.values()) + " |" for row in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")


class AggregateSummaries(Callback):
    """Hydra callback: after a multirun, write summary.csv and summary.md into the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = aggregate(sweep_dir)
        if not rows:
            log.warning("no summary.json found under %s", sweep_dir)
            return
        write_tables(sweep_dir, rows)
        print((sweep_dir / "summary.md").read_text(), flush=True)
        print(f"sweep summary: {sweep_dir / 'summary.csv'}", flush=True)
