"""Errors read as one line naming the file or key; HYDRA_FULL_ERROR=1 gives the traceback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import make_image_folder
from run_helpers import paths, run, synthetic

pytestmark = pytest.mark.integration


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("override, says", [
    ("nope=1", "Could not override 'nope'"),
    ("model=nope", "Could not find 'model/nope'"),
    ("task=train_tokenizer data=images_mnist5k", "task=train_tokenizer trains a VQ tokenizer: add tokenizer=vq"),
    ("task=convert", "task=convert needs task.seit_dir=<value>"),
    ("data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
])
def test_an_error_is_one_line_and_the_traceback_is_behind_hydra_full_error(tmp_path, override, says):
    lines = error_lines(run(*paths(tmp_path), *override.split(), check=False))
    assert len(lines) < 3 and says in lines[-1] and "Traceback" not in "\n".join(lines)
    full = run(*paths(tmp_path), *override.split(), check=False, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback (most recent call last)" in full.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    """A token dataset (with its tokenizer file) and a finished run's checkpoints."""
    tmp = tmp_path_factory.mktemp("trained")
    images = make_image_folder(tmp / "images")
    base = [*synthetic(tmp, images), f"data.root={tmp}/ds"]
    run(*base)
    assert json.loads((tmp / "run" / "summary.json").read_text())["val/acc1"] >= 0.6  # chance 1/3, measured 1.0
    return tmp, base


def test_a_truncated_checkpoint_is_named(trained, tmp_path):
    tmp, base = trained
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((tmp / "run" / "checkpoints" / "last.ckpt").read_bytes())
    lines = error_lines(run(*base, f"ckpt_path={truncate(cut)}", f"hydra.run.dir={tmp_path}/run", check=False))
    assert f"checkpoint: {cut} (" in lines[-1] and "cannot be read" in lines[-1]


def test_a_truncated_tokenizer_is_named(trained, tmp_path):
    tmp, _ = trained
    cut = tmp_path / "cut.tokenizer.safetensors"
    cut.write_bytes((tmp / "ds.tokenizer.safetensors").read_bytes())
    proc = run(*paths(tmp_path), "task=train_tokenadapt", "data=images", f"data.source={tmp}/images",
               "data.image_size=16", f"task.tokenizer={truncate(cut)}", "task.out_grid=6", "task.width=16",
               "task.heads=2", "debug=fast", check=False)
    assert f"task.tokenizer: {cut} (" in error_lines(proc)[-1]


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs: room for the configs and logs, not for a checkpoint (needs root)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_named(trained, full_disk):
    _, base = trained
    lines = error_lines(run(*base, f"hydra.run.dir={full_disk}/run", check=False))
    assert f"{full_disk}/run/" in lines[-1] and "No space left on device" in lines[-1]
    assert not list(full_disk.rglob("*.tmp"))  # no temp file left behind
