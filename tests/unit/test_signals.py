"""A run stuck between batches still ends on SIGTERM: after grace_s, or at once on a second SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import time

from conftest import REPO
from fork_server import FORK_SERVER, env

STUCK = """
import sys, time, torch, pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset
from seit.utils.signals import StopOnSigterm

class Stuck(Dataset):  # the 3rd batch never comes, like a loader waiting for a dead worker
    def __len__(self):
        return 64
    def __getitem__(self, i):
        if i == 8:
            print("stuck", flush=True)
            time.sleep(3600)
        return torch.zeros(2)

class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)
    def training_step(self, batch, i):
        return self.w(batch).sum()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.1)

pl.Trainer(callbacks=[StopOnSigterm(grace_s=float(sys.argv[1]))], logger=False, enable_checkpointing=False,
           enable_progress_bar=False, enable_model_summary=False, max_epochs=1).fit(Model(), DataLoader(Stuck(), batch_size=4))
"""


def stuck_run(grace_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([FORK_SERVER.python(), "-c", STUCK, str(grace_s)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    while (line := proc.stdout.readline()) and line.strip() != "stuck":
        pass
    assert proc.poll() is None, proc.stderr.read()
    return proc


def test_a_stuck_run_exits_grace_s_after_sigterm():
    proc = stuck_run(grace_s=2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == 143 and 2 <= time.monotonic() - t0 < 15
    assert proc.stderr.read().strip().splitlines()[-1].startswith(
        "error: stopped (no batch boundary reached within 2s of SIGTERM)")


def test_a_second_sigterm_exits_at_once():
    proc = stuck_run(grace_s=600)
    proc.send_signal(signal.SIGTERM)
    time.sleep(2)  # handled by then (two signals pending at once would be delivered as one)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == 143 and time.monotonic() - t0 < 5
    assert "error: stopped (a second signal after SIGTERM)" in proc.stderr.read()


REQUEUED = """
import signal, sys, time, torch, pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from seit.utils.signals import StopOnSigterm

def requeue(signum, frame):  # what submitit's handler does: requeue the job, then exit on the spot
    print(f"requeued at step {trainer.global_step}", flush=True)
    sys.exit(-1)

signal.signal(signal.SIGUSR2, requeue)

class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)
    def training_step(self, batch, i):
        if self.global_step == 5:
            print("step 5", flush=True)
            deadline = time.monotonic() + 60
            while not self.trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.01)  # the signal lands mid-step
        return self.w(batch).sum()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.1)

trainer = pl.Trainer(callbacks=[StopOnSigterm(grace_s=60), ModelCheckpoint(sys.argv[1], save_last=True, save_top_k=0)],
                     logger=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=1000)
trainer.fit(Model(), DataLoader(torch.zeros(64, 2), batch_size=4))
"""


def test_the_requeue_signal_saves_last_ckpt_at_a_batch_then_hands_over_to_the_requeue(tmp_path):
    """SLURM's USR2 under submitit: last.ckpt at the next batch boundary first, then submitit's own
    handler (here a stand-in that prints and exits) requeues, once."""
    import torch

    proc = subprocess.Popen([FORK_SERVER.python(), "-c", REQUEUED, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    while (line := proc.stdout.readline()) and line.strip() != "step 5":
        pass
    proc.send_signal(signal.SIGUSR2)
    rc = proc.wait(timeout=60)
    out = proc.stdout.read()
    assert rc == 255 and out.count("requeued at step") == 1, (rc, out, proc.stderr.read()[-2000:])
    step = torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"]
    assert out.strip() == f"requeued at step {step}" and step == 6  # saved right after the signalled step
