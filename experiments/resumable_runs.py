"""What the multi-run experiment scripts share: run.py once per (row, seed), skipping finished runs.

Outputs (data cache, logs) go under SEIT_ROOT when it is set, so the code can run from a git
worktree while its results land in the main checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("SEIT_ROOT", ROOT))


def run_once(overrides: list[str], run_dir: Path) -> None:
    """``run.py <overrides> run_name=<run_dir.name>`` unless run_dir already holds a summary.json."""
    if (run_dir / "summary.json").is_file():
        return
    cmd = [sys.executable, "run.py", *overrides, f"run_name={run_dir.name}", "print_config=false"]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "SEIT_ROOT": str(OUT)})
