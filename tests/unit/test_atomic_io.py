"""seit.utils.io: atomic writes leave the old file or the whole new one, and no temporary file."""

import os
import stat

import pytest
import torch

from seit.utils.io import atomic_open, atomic_path, atomic_save_tensors, atomic_write_bytes


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["a.bin"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk"):
        with atomic_open(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "b.pt") as tmp:
            torch.save({"x": 1}, tmp)
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["a.bin"]  # nothing new, no temporary


def test_atomic_path_for_writers_that_take_a_name(tmp_path):
    target = tmp_path / "w.pt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and tmp.name.startswith(".w.pt.")
        with atomic_path(target) as other:
            assert other != tmp  # unique names: two writers of one file do not share a temporary
        torch.save({"x": torch.arange(3)}, tmp)
    assert torch.equal(torch.load(target)["x"], torch.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["w.pt"]


def test_safetensors_are_written_atomically_and_canonically(tmp_path):
    from safetensors.torch import load_file

    atomic_save_tensors(tmp_path / "t.safetensors", {"a": torch.ones(2)}, metadata={"z": "1", "a": "2"})
    assert torch.equal(load_file(tmp_path / "t.safetensors")["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["t.safetensors"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
