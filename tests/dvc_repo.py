"""A temporary git + DVC project built from this repository's dvc.yaml, params.yaml and src/,
and the way to run commands in it as a user would: the venv's `dvc` and `lipdd` in a
subprocess, the project as working directory, no MLFLOW_TRACKING_URI (so the store is the
default sqlite:///<project>/mlflow.db)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lipdd import config as configlib
from lipdd.runs import KIND

ROOT = Path(__file__).resolve().parents[1]

# params.yaml values that make the whole pipeline run in seconds on two CPU cores.
PATCH = dict(
    epochs=4,
    eval_every=2,
    save_checkpoint=2,
    width=2,
    label_noise=0.2,
    batch_size=128,
    device="cpu",
)
STATS_PATCH = dict(
    num_samples=200,
    batch_size=100,
    curvature_samples=200,
    hutchinson_probes=10,
    probe_samples=20,
    worst_steps=3,
)


def clean_env(tmp: Path) -> dict[str, str]:
    """The environment of every command: the venv first on PATH, no tracking URI, none of the
    variables lipdd reads as config (NAME, DEVICE, ...), no DVC/git state of an outer process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "DVC_", "GIT_")) and k not in configlib.ENV_VARS
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_SITE_CACHE_DIR"] = str(tmp / "dvc-site-cache")  # not /var/tmp/dvc
    env["OMP_NUM_THREADS"] = "1"  # a width-2 CNN on 8x8 images: threads cost more than they save
    return env


class Repo:
    """A temporary project repository and the way to run commands in it."""

    def __init__(self, path: Path, env: dict[str, str]):
        self.path, self.env = path, env
        self.uri = f"sqlite:///{path / 'mlflow.db'}"

    def run(
        self, *cmd: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            cmd, cwd=self.path, env=env or self.env, capture_output=True, text=True
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"`{' '.join(cmd)}` exited with status {proc.returncode}\n"
                "--- stdout ---\n"
                f"{proc.stdout}\n"
                "--- stderr ---\n"
                f"{proc.stderr}",
                pytrace=False,
            )
        return proc

    def sweep(
        self, *params: str, name: str | None = None, jobs: int = 2, timeout: float = 300
    ) -> None:
        """`dvc exp run --queue [-n NAME] -S ...`, then `dvc queue start -j JOBS`, and wait until
        no queued experiment is queued or running; fails with the log of one that failed. The
        queue's daemon keeps what it inherits open until its last worker exits, so `queue start`
        writes to a file, not to pipes this process would wait on; `dvc queue stop` ends the
        workers."""
        named = ("-n", name) if name else ()
        self.run("dvc", "exp", "run", "--queue", *named, *(a for p in params for a in ("-S", p)))
        with open(self.path.parent / "queue.log", "a") as log:
            start = ["dvc", "queue", "start", "-j", str(jobs)]
            subprocess.run(start, cwd=self.path, env=self.env, stdout=log, stderr=log, check=True)
        try:
            deadline = time.time() + timeout
            while time.time() < deadline:
                polled = self.run("dvc", "queue", "status", check=False)
                # DVC's status reads the workers' info files without a lock and, racing a write,
                # fails once ("Expecting value"): ask again.
                status = polled.stdout if polled.returncode == 0 else f"Running? {polled.stderr}"
                if "Queued" not in status and "Running" not in status:
                    break
                time.sleep(2)
            failed = [line.split()[0] for line in status.splitlines() if "Failed" in line]
            assert not failed, self.run("dvc", "queue", "logs", failed[0], check=False).stdout
            assert "Queued" not in status and "Running" not in status, status
        finally:
            self.run("dvc", "queue", "stop", check=False)

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)

    def runs(self):
        """Every run in the store, oldest first."""
        client = self.client()
        ids = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(ids, order_by=["attributes.start_time ASC"]) if ids else []

    def training_runs(self):
        """The runs of `lipdd train`: all but those of the report stage (tagged
        lipdd.kind=report)."""
        return [r for r in self.runs() if r.data.tags.get(KIND) != "report"]

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def meta(self) -> dict:
        data = self.params()
        return json.loads(
            (self.path / data["prepared_dir"] / data["data"] / "meta.json").read_text()
        )


# The stats of a scenario about where runs land (hosts, logins), not about what is measured: one
# per-sample measure, no per-network measure or probe set, so the report draws a few panels.
LEAN_STATS = dict(metric=["jacobian_operator_norm", "accuracy"], normalization=["none"], probes=[])


def make_repo(path: Path, env: dict[str, str], stats: dict | None = None) -> Repo:
    """git + DVC repository holding the project's dvc.yaml, params.yaml (patched, `stats` on top
    of STATS_PATCH) and src/ (the stages' code dependencies), committed."""
    path.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = sorted(set(PATCH) - set(params)) + sorted(set(STATS_PATCH) - set(params["stats"]))
    assert not missing, f"params.yaml lacks {missing}"
    params.update(PATCH)
    params["stats"].update(STATS_PATCH, **(stats or {}))
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(
        ROOT / "src", path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    gitignore = (ROOT / ".gitignore").read_text() if (ROOT / ".gitignore").exists() else ""
    (path / ".gitignore").write_text(
        gitignore + "\nmlflow.db\nmlflow.db-*\nmlartifacts/\nmlruns/\n"
    )
    repo = Repo(path, env)
    repo.run("git", "init", "-q")
    repo.run("git", "config", "user.name", "lipdd tests")
    repo.run("git", "config", "user.email", "tests@lipdd.invalid")
    repo.run("git", "config", "commit.gpgsign", "false")
    repo.run("dvc", "init", "-q")
    shutil.copy(ROOT / ".dvcignore", path / ".dvcignore")
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-q", "-m", "pipeline under test")
    return repo
