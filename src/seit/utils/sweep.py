"""Multirun aggregation: one table built from the jobs' summary.json files, and one figure of their
validation curves against training time (``accuracy_vs_time.png``, one line per job)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
COLUMNS = ("val/acc1", "val/acc5", "val/loss", "wall_s", "samples_per_s", "global_step")


def job_summaries(sweep_dir: str | Path) -> list[tuple[Path, dict]]:
    """(job dir, summary) of every job dir holding a summary.json, in job order."""
    paths = sorted(Path(sweep_dir).glob("*/summary.json"), key=lambda p: (len(p.parent.name), p.parent.name))
    return [(path.parent, json.loads(path.read_text())) for path in paths]


def job_overrides(job_dir: Path) -> list[str]:
    """The job's command-line overrides, from its .hydra/overrides.yaml ([] when there is none)."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return []
    return [line[2:].strip() for line in overrides_file.read_text().splitlines() if line.startswith("- ")]


def aggregate(sweep_dir: str | Path) -> list[dict]:
    """Rows of (job, overrides, metrics) for every job dir holding a summary.json."""
    return [{"job": job_dir.name, "overrides": " ".join(job_overrides(job_dir)), **{c: summary.get(c) for c in COLUMNS},
             "config_hash": summary.get("config_hash")} for job_dir, summary in job_summaries(sweep_dir)]


def sweep_curves(sweep_dir: str | Path) -> dict[str, list[dict]]:
    """{label: curve points} of every job with a non-empty curve. A label is the job's overrides
    that not all jobs share (the swept values: "seed=1"), or the job's number when none differ."""
    jobs = [(job_dir, job_overrides(job_dir), summary["curve"])
            for job_dir, summary in job_summaries(sweep_dir) if summary.get("curve")]
    shared = set.intersection(*(set(overrides) for _, overrides, _ in jobs)) if jobs else set()
    return {" ".join(o for o in overrides if o not in shared) or f"job {job_dir.name}": curve
            for job_dir, overrides, curve in jobs}


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
    """Hydra callback: after a multirun, write summary.csv, summary.md and the jobs' curves against
    training time (accuracy_vs_time.png, or <metric>_vs_time.png) into the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = aggregate(sweep_dir)
        if not rows:
            log.warning("no summary.json found under %s", sweep_dir)
            return
        write_tables(sweep_dir, rows)
        print((sweep_dir / "summary.md").read_text(), flush=True)
        print(f"sweep summary: {sweep_dir / 'summary.csv'}", flush=True)
        from seit.utils.visuals import time_curves_png  # torch and matplotlib: not at every run's start

        if (curves := sweep_curves(sweep_dir)) and (figure := time_curves_png(curves, sweep_dir)):
            print(f"sweep curves: {figure}", flush=True)
