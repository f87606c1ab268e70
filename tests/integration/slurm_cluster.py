"""A one-node SLURM cluster for the tests: munge, slurmctld and slurmd on this machine.

``start_cluster`` installs Debian's packages when ``sbatch`` is missing (root and the package
registry are needed), writes a slurm.conf with one CPU partition ``cpu`` holding this host, starts
the daemons on free ports and waits until the node is idle. Every SLURM command of the tests finds
that config through ``SLURM_CONF``. Where any step cannot be done, the caller skips with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]


class Unavailable(Exception):
    """SLURM cannot run here; the message says why."""


@dataclass
class Cluster:
    root: Path
    conf: Path
    partition: str = "cpu"
    cpus: int = 1
    pids: list[int] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def cmd(self, *args: str, check: bool = False) -> str:
        """A SLURM command (squeue, scancel, scontrol ...) against this cluster; its stdout."""
        return subprocess.run(args, capture_output=True, text=True, timeout=60, check=check,
                              env={**os.environ, **self.env()}).stdout

    def stop(self) -> None:
        self.cmd("scancel", "--full", "--user", "root")
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _sh(*cmd: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _install() -> None:
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and this is not a root Debian machine that could install it")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    proc = _sh("apt-get", "install", "-y", "-q", *PACKAGES, timeout=600, env=env)
    if proc.returncode:
        _sh("apt-get", "update", "-q", timeout=600, env=env)
        proc = _sh("apt-get", "install", "-y", "-q", *PACKAGES, timeout=600, env=env)
    if proc.returncode:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr.strip()[-300:]}")


def _munge() -> None:
    if _sh("sh", "-c", "munge -n | unmunge").returncode == 0:
        return
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    for d in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
    _sh("chown", "-R", "munge:munge", "/etc/munge", "/run/munge", "/var/lib/munge", "/var/log/munge")
    _sh("su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged")
    if _sh("sh", "-c", "munge -n | unmunge").returncode:
        proc = _sh("/usr/sbin/munged", "--force")
        if _sh("sh", "-c", "munge -n | unmunge").returncode:
            raise Unavailable(f"munged does not start: {proc.stderr.strip()[-300:]}")


def start_cluster(root: Path, timeout_s: float = 60) -> Cluster:
    """Install (if needed) and start a one-node cluster whose state lives under ``root``."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise Unavailable("slurmd must run as root, and these tests are not")
    _install()
    _munge()
    node = _sh("hostname", "-s").stdout.strip()
    probe = _sh("slurmd", "-C").stdout
    cpus = int(next((w.split("=")[1] for w in probe.split() if w.startswith("CPUs=")), os.cpu_count() or 1))
    memory = int(next((w.split("=")[1] for w in probe.split() if w.startswith("RealMemory=")), 2048))
    root.mkdir(parents=True, exist_ok=True)
    for d in ("state", "spool"):
        (root / d).mkdir(exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=seit-tests
SlurmctldHost={node}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobCompType=jobcomp/none
KillWait=10
MinJobAge=300
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmdSpoolDir={root}/spool
StateSaveLocation={root}/state
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={node} CPUs={cpus} RealMemory={memory - 512} State=UNKNOWN
PartitionName=cpu Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
    cluster = Cluster(root, conf, cpus=cpus)
    env = cluster.env()
    for daemon in ("slurmctld", "slurmd"):
        proc = _sh(f"/usr/sbin/{daemon}", "-f", str(conf), env=env)
        if proc.returncode:
            cluster.stop()
            raise Unavailable(f"{daemon} does not start: {proc.stderr.strip()[-300:]}")
        pid_file = root / f"{daemon}.pid"
        deadline = time.monotonic() + 10
        while not pid_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_file.is_file():
            cluster.pids.append(int(pid_file.read_text().split()[0]))
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        state = _sh("sinfo", "-h", "-o", "%T", env=env).stdout.strip()
        if state in ("idle", "mixed", "allocated"):
            return cluster
        time.sleep(0.5)
    cluster.stop()
    raise Unavailable(f"the SLURM node did not come up within {timeout_s:.0f}s (state {state!r}; "
                      f"see {root}/slurmctld.log and slurmd.log)")
