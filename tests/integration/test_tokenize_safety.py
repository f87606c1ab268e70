"""Through run.py: tokenize never rebuilds a directory it did not plan, its workers die with it, and a bad
source is one error line."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch.utils.data
from PIL import Image

from conftest import make_image_folder
from run_helpers import run, start, synthetic

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
                 "data.build.codec_fit_samples=16", "tokenizer.fit_images=64", fresh=True)
    deadline = time.monotonic() + 120
    while not (root / "shards").is_dir() or not any((root / "shards").glob("*.tar")):
        assert proc.poll() is None and time.monotonic() < deadline, "tokenize ended before it wrote a shard"
        time.sleep(0.02)
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(workers) >= 2
    # an idle torch worker notices its parent is gone at its next queue poll, every 5 s
    # (MP_STATUS_CHECK_INTERVAL); measured 4.1-4.99 s after the kill, so 5 s left no margin
    deadline = time.monotonic() + torch.utils.data._utils.MP_STATUS_CHECK_INTERVAL + 10
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)]
    written = sorted((root / "shards").glob("*.tar"))
    time.sleep(2)
    assert sorted((root / "shards").glob("*.tar")) == written and len(written) < 1600 // 8


def test_a_source_tar_with_a_key_twice_is_one_error_line_and_nothing_is_written(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    with tarfile.open(tmp_path / "images" / "train" / "000.tar", "w") as tar:
        for i, name in enumerate(["s000.jpg", "s000.cls", "s000.jpeg", "s000.cls"]):
            buf = io.BytesIO()
            Image.fromarray(np.full((16, 16, 3), i * 60, np.uint8)).save(buf, "JPEG")
            data = buf.getvalue() if name.endswith(("jpg", "jpeg")) else b"0"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    root = tmp_path / "ds"
    proc = run(*synthetic(tmp_path, tmp_path / "images"), "task=tokenize", f"data.root={root}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "000.tar: key s000 appears twice (s000.jpg and s000.jpeg)" in errors[0]
    assert not root.exists() and not (tmp_path / "ds.tokenizer.safetensors").exists()
