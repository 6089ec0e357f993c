"""`lipdd sweep --slurm` on a real single-node SLURM cluster (tests/slurm_cluster.py): a grid as
a job array into one MLflow server, visible to `dvc exp show` and `lipdd report`; a job warned
with SIGUSR1 checkpoints and requeues, killed outright later it continues, and it ends bitwise
where an uninterrupted training ends; one checkpoint's stats sharded over an array and merged
equal one process's."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time

import pytest
import torch

from dvc_repo import LEAN_STATS, clean_env, make_repo
from lipdd import cli
from lipdd.tracking import list_checkpoints
from mlflow_server import MlflowServer
from slurm_cluster import Cluster, available
from stats_results import assert_same_results, results


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    available()
    c = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def project(cluster, tmp_path, **env):
    repo = make_repo(
        tmp_path / "project",
        {**clean_env(tmp_path), "SLURM_CONF": str(cluster.conf), **env},
        stats=LEAN_STATS,
    )
    return repo


def job_ids(output: str) -> list[str]:
    return re.search(r"SLURM jobs ([\d_ ]+);", output).group(1).split()


def test_a_sweep_is_a_job_array_into_one_server(cluster, tmp_path):
    with MlflowServer(tmp_path / "server", clean_env(tmp_path)) as server:
        repo = project(cluster, tmp_path, MLFLOW_TRACKING_URI=server.uri)
        repo.uri = server.uri
        sweep = repo.run(
            "lipdd", "sweep", "--slurm", "--parallel", "2", "--name", "grid",
            "-S", "width=2,3", "-S", "seed=1,2",
        )  # fmt: skip
        ids = job_ids(sweep.stderr)
        array = ids[0].split("_")[0]
        assert ids == [f"{array}_{i}" for i in range(4)]  # one array of four tasks
        # submitit has the results once they are written; SLURM ends the tasks a moment later
        deadline = time.time() + 30
        while {cluster.job(f"{array}_{i}")["JobState"] for i in range(4)} != {"COMPLETED"}:
            assert time.time() < deadline, [cluster.job(f"{array}_{i}") for i in range(4)]
            time.sleep(0.5)
        assert [cluster.job(f"{array}_{i}")["ArrayTaskId"] for i in range(4)] == list("0123")

        runs = repo.training_runs()
        assert sorted((r.data.params["width"], r.data.params["seed"]) for r in runs) == [
            ("2", "1"), ("2", "2"), ("3", "1"), ("3", "2"),
        ]  # fmt: skip
        assert all(r.info.status == "FINISHED" for r in runs)
        assert {r.data.tags["dvc_exp_name"] for r in runs} == {f"grid-000{i}" for i in range(4)}

        shown = json.loads(repo.run("dvc", "exp", "show", "--json").stdout)
        experiments = {e["name"]: e for c in shown for e in (c.get("experiments") or [])}
        assert sorted(experiments) == [f"grid-000{i}" for i in range(4)]
        for r in runs:
            data = experiments[r.data.tags["dvc_exp_name"]]["revs"][0]["data"]
            assert data["metrics"]["results/train/run.json"]["data"]["run_id"] == r.info.run_id
        assert not list((repo.path / ".lipdd/sweeps/grid").glob("0*"))  # workspaces gone

        report = repo.run("lipdd", "report", "--params", "params.yaml")
        assert "drawing 4 runs" in report.stderr
        assert (repo.path / "results/report/error_vs_width.png").stat().st_size > 10_000


def final_weights(client, run_id):
    epoch, path = list_checkpoints(client, run_id)[-1]
    with tempfile.TemporaryDirectory() as tmp:
        return epoch, torch.load(client.download_artifacts(run_id, path, tmp), weights_only=True)


LONG = ["-S", "epochs=40", "-S", "batch_size=16"]


def wait_for_epoch(repo, cluster, job, epoch, timeout=120):
    """Until the job's training has logged `epoch`."""
    client, deadline = repo.client(), time.time() + timeout
    while True:
        runs = [r for r in repo.training_runs() if r.info.status == "RUNNING"]
        history = client.get_metric_history(runs[0].info.run_id, "epoch_loss") if runs else []
        if history and max(m.step for m in history) >= epoch:
            return
        assert time.time() < deadline, cluster.job(job)
        time.sleep(0.3)


def wait_until(cluster, job, state, restarts=None, timeout=180):
    deadline = time.time() + timeout
    while True:
        info = cluster.job(job)
        if info["JobState"] == state and restarts in (None, info.get("Restarts")):
            return info
        assert time.time() < deadline, info
        time.sleep(0.5)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """The final weights of the interrupted tests' training, run once without interruption in a
    project of its own (the same params.yaml, so the same prepared data)."""
    repo = project(cluster, tmp_path_factory.mktemp("uninterrupted"))
    repo.run("lipdd", "train", "--params", "params.yaml", "--epochs", "40", "--batch-size", "16",
             "--save-checkpoint", "0", "--name", "uninterrupted")  # fmt: skip
    (run,) = repo.training_runs()
    return final_weights(repo.client(), run.info.run_id)


def assert_ends_as_uninterrupted(repo, uninterrupted) -> list[int]:
    """The sweep's one training run FINISHED with the weights of the same training run
    uninterrupted; returns its checkpoints' epochs."""
    client = repo.client()
    (run,) = repo.training_runs()
    assert run.info.status == "FINISHED"
    (e1, interrupted), (e2, plain) = final_weights(client, run.info.run_id), uninterrupted
    assert e1 == e2 == 40
    assert all(torch.equal(interrupted["model"][k], plain["model"][k]) for k in plain["model"])
    return [e for e, _ in list_checkpoints(client, run.info.run_id)]


def test_a_warned_job_requeues_a_killed_one_continues_and_both_end_bitwise(
    cluster, tmp_path, uninterrupted
):
    """One training interrupted both ways SLURM interrupts: warned with USR1 it checkpoints at
    the end of its epoch and the job requeues itself; killed outright, the same command continues
    it from its last checkpoint."""
    repo = project(cluster, tmp_path)
    command = ["lipdd", "sweep", "--slurm", "--no-wait", "--name", "interrupted", *LONG]
    command += ["-S", "save_checkpoint=10"]
    (job,) = job_ids(repo.run(*command).stderr)
    wait_for_epoch(repo, cluster, job, 3)
    subprocess.run(["scancel", "--signal=USR1", job], env=repo.env, check=True)
    # Requeued, a job waits out a begin time SLURM sets (about 2 minutes) to keep a failing job
    # from cycling; the test lets it start at once.
    wait_until(cluster, job, "PENDING", restarts="1")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=repo.env)
    (run,) = repo.training_runs()
    warned = list_checkpoints(repo.client(), run.info.run_id)[-1][0]  # the warned epoch's
    assert warned < 40
    wait_for_epoch(repo, cluster, job, warned + 1)  # the requeued job trains on
    subprocess.run(["scancel", "--signal=KILL", "--full", job], env=repo.env, check=True)
    wait_until(cluster, job, "CANCELLED")
    (run,) = repo.training_runs()
    # SLURM's kill (SIGTERM first) has it marked KILLED; a lost node would leave it RUNNING
    # with its process gone: either is a run the same training continues.
    assert run.info.status in ("KILLED", "RUNNING")
    # The same command again: its job finds the workspace and the interrupted run.
    (again,) = job_ids(repo.run(*command).stderr)
    wait_until(cluster, again, "COMPLETED")
    assert assert_ends_as_uninterrupted(repo, uninterrupted) == sorted({*range(0, 41, 10), warned})


def test_stats_of_one_checkpoint_sharded_over_an_array_equal_one_process(
    cluster, tiny_run, workdir
):
    """Upstream's layout for many GPUs on SLURM: an array task per --skip range of one
    checkpoint's samples, then `lipdd stats --merge`: the files of one process over them all."""
    flags = ["--run-id", tiny_run, "--checkpoint", "1", "--batch-size", "50", "--device", "cpu"]
    flags += ["--metric", "jacobian_operator_norm", "accuracy", "lipschitz_upper_bound"]
    flags += ["--normalization", "none", "softmax"]
    task = "lipdd stats " + " ".join(flags) + " --num-samples 100 --output-dir shards"
    env = {**clean_env(workdir), "SLURM_CONF": str(cluster.conf)}
    subprocess.run(
        ["sbatch", "--array=0-1", "--wait", "--chdir", str(workdir), "-o", "task-%a.out", "--wrap",
         f"{task} --skip $((SLURM_ARRAY_TASK_ID * 100))"],
        env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    shards = results(workdir / "shards")
    assert sorted(n for n in shards if n.startswith("accuracy")) == [
        f"accuracy-train-checkpoint-1-id-{i}.json" for i in (0, 2)
    ]
    assert cli.main(["stats", *flags, "--merge", "--output-dir", "shards"]) == 0
    assert cli.main(["stats", *flags, "--num-samples", "200", "--output-dir", "one"]) == 0
    assert_same_results(results(workdir / "shards"), results(workdir / "one"), shards=True)
