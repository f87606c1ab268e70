"""Output dirs: an unnamed run gets one nobody else has; a named run or a job comes back to its own."""

from __future__ import annotations

import pytest

from seit.utils import config
from seit.utils.config import run_dir


@pytest.fixture(autouse=True)
def no_job(monkeypatch):
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def test_unnamed_runs_in_the_same_second_with_the_same_random_part_still_differ(tmp_path, monkeypatch):
    monkeypatch.setattr(config.time, "strftime", lambda fmt: "2026-01-01_00-00-00")
    suffixes = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(config.secrets, "token_hex", lambda n: next(suffixes))
    first, second = run_dir(str(tmp_path), None), run_dir(str(tmp_path), None)
    assert first.endswith("_aaaaaa") and second.endswith("_bbbbbb")  # the clash was seen and avoided
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2026-01-01_00-00-00_aaaaaa", "2026-01-01_00-00-00_bbbbbb"]


def test_a_named_run_and_a_job_come_back_to_their_dir(tmp_path, monkeypatch):
    assert run_dir(str(tmp_path), "mine") == f"{tmp_path}/mine"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert run_dir(str(tmp_path), None) == f"{tmp_path}/slurm-4242"  # a requeued job resumes there
    assert run_dir(str(tmp_path), "mine") == f"{tmp_path}/mine"


def test_ranks_without_a_shared_id_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="set run_name"):
        run_dir(str(tmp_path), None)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert run_dir(str(tmp_path), None) == f"{tmp_path}/torchrun-abc"


def test_slurm_layout_follows_the_trainer():
    from omegaconf import OmegaConf

    from seit.utils.config import slurm_layout

    def layout(**trainer):
        t = OmegaConf.create({"accelerator": "auto", "devices": 1, **trainer})
        return tuple(slurm_layout(w, t) for w in ("nodes", "tasks_per_node", "gpus_per_node"))

    assert layout() == (1, 1, None)  # the default trainer: one task, no GPU asked for
    assert layout(accelerator="gpu", devices=1) == (1, 1, 1)
    assert layout(strategy="ddp", accelerator="cpu", devices=2, num_nodes=1) == (1, 2, None)
    assert layout(strategy="ddp", accelerator="gpu", devices=8, num_nodes=2) == (2, 8, 8)
    assert layout(strategy="ddp_find_unused_parameters_true", accelerator="gpu", devices=[0, 1]) == (1, 2, 2)
    with pytest.raises(ValueError, match="trainer.devices=auto: a SLURM job runs one task per device"):
        layout(strategy="ddp", devices="auto")
