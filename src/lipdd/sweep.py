"""`lipdd sweep -S 'width=1,2,4' -S seed=1,2`: every point of a parameter grid as a DVC
experiment, run here one after another (the default) or as a SLURM job array (submitit).

Each point is one job in a workspace of its own: a clone of the project's HEAD under
.lipdd/sweeps/<sweep>/<point>, sharing the project's DVC cache, in which
`dvc exp run -n NAME -S ... stats` runs the pipeline through its stats stage against the
project's MLflow store or server, then `dvc exp push` sends the experiment to the project, where
`dvc exp show` lists it. No point draws a report: each would draw every run the store holds so far;
`lipdd report` draws the sweep once. Why not
`dvc exp run --queue` on the cluster: DVC's queue runs its workers on one machine, and parallel
`dvc exp run --temp` in one repository serialise on its lock (DVC issues #1057, #7419); a clone
per job has no shared lock, and its experiment arrives through git as any remote's would.

On SLURM each job gets `--signal=USR1@60`: the training checkpoints at the end of its epoch and
stops (lipdd.train), and submitit requeues the job, which runs the same point again in the same
workspace, where the training continues its run. A job killed outright continues, requeued or
run again by hand, from its last checkpoint."""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")  # read by submitit at import
import submitit  # noqa: E402
import yaml  # noqa: E402

from .errors import ConfigError  # noqa: E402


def values(spec: str) -> list[str]:
    """`1,2,4` or `range(1, 65)` (Python's, as in `dvc exp run -S`) as the values one key takes."""
    if m := re.fullmatch(r"range\((-?\d+)\s*,\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?\)", spec.strip()):
        start, stop, step = int(m[1]), int(m[2]), int(m[3] or 1)
        if step == 0:
            raise ConfigError(f"sweep: {spec!r}: range step 0")
        return [str(v) for v in range(start, stop, step)]
    return [v.strip() for v in spec.split(",") if v.strip()]


def grid(assignments: list[str]) -> list[dict[str, str]]:
    """Every combination of the `key=values` assignments, the first key slowest."""
    keys, choices = [], []
    for assignment in assignments:
        key, eq, spec = assignment.partition("=")
        if not eq or not key.strip() or not values(spec):
            raise ConfigError(f"sweep: -S {assignment!r} is not KEY=VALUES (1,2,4 or range(1,65))")
        keys.append(key.strip())
        choices.append(values(spec))
    if len(set(keys)) != len(keys):
        raise ConfigError(f"sweep: a key is set twice in {assignments}")
    return [dict(zip(keys, combination)) for combination in itertools.product(*choices)]


@dataclass
class Point(submitit.helpers.Checkpointable):
    """One point of a sweep: its workspace, experiment name and parameters; called, it runs the
    pipeline there and pushes the experiment to the project. Rerun, it continues."""

    project: str
    workspace: str
    name: str
    params: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *command: str) -> None:
        # SIG_IGN is inherited across exec: DVC (which would die of SIGUSR1) ignores the
        # scheduler's warning, and lipdd train, which installs its own handler, acts on it.
        self._process = subprocess.Popen(
            command,
            cwd=self.workspace,
            env={**os.environ, **self.env},
            preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN),
        )
        if self._process.wait():
            raise RuntimeError(f"{' '.join(command)} exited {self._process.returncode}")

    def __call__(self) -> str:
        ws = Path(self.workspace)
        if not (ws / ".git").exists():
            ws.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "clone", "-q", self.project, str(ws)], check=True)
            cache = Path(self.project) / ".dvc" / "cache"
            subprocess.run(["dvc", "cache", "dir", "--local", str(cache)], cwd=ws, check=True)
        sets = [a for k, v in self.params.items() for a in ("-S", f"{k}={v}")]
        self.run("dvc", "exp", "run", "-q", "-n", self.name, *sets, "stats")
        self.run("dvc", "exp", "push", "-q", "--no-cache", self.project, self.name)
        return (ws / "results" / "train" / "run.json").read_text()

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """On the scheduler's warning (submitit calls it from its signal handler): pass the
        warning to the training below DVC, wait for it to checkpoint and stop, then requeue this
        very point."""
        import psutil

        process = getattr(self, "_process", None)
        if process is not None and process.poll() is None:
            dvc = psutil.Process(process.pid)
            for child in dvc.children(recursive=True):
                child.send_signal(signal.SIGUSR1)
            # Not process.wait(): this runs in a signal handler that interrupted a wait() on the
            # same process, which holds its lock.
            psutil.wait_procs([dvc], timeout=50)
        fresh = Point(self.project, self.workspace, self.name, self.params, self.env)
        return submitit.helpers.DelayedSubmission(fresh)


def committed_project() -> Path:
    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if out.returncode != 0 or not (Path(out.stdout.strip()) / "dvc.yaml").exists():
        raise ConfigError("sweep: run it in the project's git repository (dvc.yaml at its root)")
    root = Path(out.stdout.strip())
    if subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout.strip():
        raise ConfigError("sweep: commit your changes first: every job clones the project's HEAD")
    return root


def sweep(args: argparse.Namespace) -> int:
    """`lipdd sweep` with its parsed flags (lipdd.cli.build_sweep_parser)."""
    try:
        points = grid(args.set)
        root = committed_project()
        params = yaml.safe_load((root / "params.yaml").read_text())
        for key in points[0]:
            node = params
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(f"sweep: -S {key}: no such key in params.yaml")
                node = node[part]
    except ConfigError as e:
        print(f"lipdd sweep: error: {e}", file=sys.stderr)
        return 2
    name = args.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    base = root / ".lipdd" / "sweeps" / name
    # Every job's runs land in the project's store and artifact folder, not its clone's (or on
    # the server MLFLOW_TRACKING_URI names, which the jobs inherit).
    env = {"LIPDD_ROOT": str(root)}
    jobs = [
        Point(str(root), str(base / f"{i:04d}"), f"{name}-{i:04d}", params, env)
        for i, params in enumerate(points)
    ]
    print(f"lipdd sweep: {name}: {len(jobs)} points", file=sys.stderr)
    if not args.slurm:
        for job in jobs:
            print(f"{job.name}: {job.params}", file=sys.stderr)
            job()
            shutil.rmtree(job.workspace)
        return 0
    executor = submitit.AutoExecutor(folder=base / "slurm", cluster="slurm")
    executor.update_parameters(
        name=name,
        timeout_min=args.time,
        cpus_per_task=args.cpus,
        slurm_array_parallelism=args.parallel,
        slurm_signal_delay_s=60,
        **({"slurm_partition": args.partition} if args.partition else {}),
        **({"gpus_per_node": args.gpus} if args.gpus else {}),
    )
    submitted = executor.submit_array(jobs)
    ids = [job.job_id for job in submitted]
    print(f"lipdd sweep: SLURM jobs {' '.join(ids)}; logs in {base / 'slurm'}", file=sys.stderr)
    if args.no_wait:
        return 0
    failed = []
    for job, point in zip(submitted, jobs):
        try:
            job.result()
            shutil.rmtree(point.workspace, ignore_errors=True)  # its experiment is in the project
        except Exception as e:  # one point's failure is reported, the others still count; its
            # workspace stays, for a look and for the same command to continue it
            failed.append(f"{point.name} ({job.job_id}): {str(e).strip().splitlines()[-1][:300]}")
    for line in failed:
        print(f"lipdd sweep: failed: {line}", file=sys.stderr)
    return 1 if failed else 0
