"""Through run.py: tokenize never rebuilds a directory it did not plan, and its workers die with it."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import make_image_folder
from run_helpers import paths, run, start, synthetic

pytestmark = pytest.mark.integration


def shard_shas(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "shards").iterdir())}


def test_training_does_not_rebuild_a_dataset_that_lost_its_dataset_json(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=2, train=20, val=4)
    root = tmp_path / "ds"
    run(*synthetic(tmp_path, images), "task=tokenize", f"data.root={root}")
    (root / "dataset.json").unlink()
    before = shard_shas(root)
    proc = run(*synthetic(tmp_path, images), f"data.root={root}", "data.build.shard_size=7", check=False)
    assert proc.returncode != 0 and f"{root} holds" in proc.stderr and "tokenize plan" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert shard_shas(root) == before and not (root / "dataset.json").exists()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_killing_tokenize_kills_its_workers(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=4, train=400, val=2)
    root = tmp_path / "ds"
    overrides = [o for o in synthetic(tmp_path, images, image_size=32, patch_size=4)
                 if not o.startswith(("data.build.workers=", "data.build.shard_size="))]
    proc = start(*overrides, "task=tokenize", f"data.root={root}", "data.build.workers=2", "data.build.shard_size=8",
                 "data.build.codec_fit_samples=16", "tokenizer.fit_images=64")
    deadline = time.monotonic() + 120
    while not (root / "shards").is_dir() or not any((root / "shards").glob("*.tar")):
        assert proc.poll() is None and time.monotonic() < deadline, "tokenize ended before it wrote a shard"
        time.sleep(0.02)
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(workers) >= 2
    deadline = time.monotonic() + 5
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)]
    written = sorted((root / "shards").glob("*.tar"))
    time.sleep(2)
    assert sorted((root / "shards").glob("*.tar")) == written and len(written) < 1600 // 8
