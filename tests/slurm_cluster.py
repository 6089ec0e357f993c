"""A real single-node SLURM cluster for the tests: munge, slurmctld and slurmd (Debian's
packages; .ci/run installs them), configured in a temporary folder, started as root and
stopped again. Without the packages the tests that need it skip, unless LIPDD_REQUIRE_SLURM=1
(CI) makes that a failure."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun")


def available() -> None:
    """Skips (or, under LIPDD_REQUIRE_SLURM=1, fails) where the cluster cannot run."""
    missing = [
        d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()
    ]
    reason = f"SLURM not installed ({', '.join(missing)} missing)" if missing else None
    if reason is None and os.geteuid() != 0:
        reason = "the SLURM daemons start as root"
    if reason and os.environ.get("LIPDD_REQUIRE_SLURM") == "1":
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)


def node_line() -> str:
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("NodeName="))


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> "Cluster":
        host = socket.gethostname().split(".")[0]
        for d in ("state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=lipdd-test",
                    f"SlurmctldHost={host}",
                    "SlurmUser=root",
                    "AuthType=auth/munge",
                    "ProctrackType=proctrack/pgid",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "ReturnToService=2",
                    "MinJobAge=600",  # finished jobs stay visible to scontrol for the test
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.root / 'slurmd.log'}",
                    node_line() + " State=UNKNOWN",
                    f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            subprocess.run(["munged", "--force"], check=True, capture_output=True)
            self.munged = True
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(self.conf)], check=True, env=self.env)
        deadline = time.time() + 60
        while True:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env
            )
            if out.returncode == 0 and out.stdout.strip() == "idle":
                return self
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"SLURM did not come up: {out.stdout} {out.stderr}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancels every job, then ends the daemons started with this configuration (their
        command lines name it) and the job steps they leave, and munged if it was started here."""
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for sig in ("TERM", "KILL"):
            subprocess.run(["pkill", f"-{sig}", "-f", str(self.conf)], capture_output=True)
            subprocess.run(["pkill", f"-{sig}", "-x", "slurmstepd"], capture_output=True)
            deadline = time.time() + 10
            while time.time() < deadline and self.running():
                time.sleep(0.2)
        if getattr(self, "munged", False):
            subprocess.run(["pkill", "-x", "munged"], capture_output=True)

    def running(self) -> bool:
        found = subprocess.run(["pgrep", "-f", str(self.conf)], capture_output=True)
        return found.returncode == 0

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`'s fields of one job."""
        out = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id],
            capture_output=True,
            text=True,
            env=self.env,
            check=True,
        ).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)
