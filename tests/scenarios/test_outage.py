"""A tracking server that goes away mid-training, for longer than MLflow's client retries last:
the training goes on, keeps what it logs, writes it once the server is back, and ends with every
batch loss and every checkpoint, each once. Past tracking_outage_limit it stops, resumable."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from dvc_repo import clean_env
from lipdd.tracking import list_checkpoints
from mlflow_server import MlflowServer
from tiny import TINY_FLAGS

STEPS_PER_EPOCH = 6  # ceil(1297 / 256)
TINY = [*TINY_FLAGS, "--save-checkpoint", "10", "--eval-every", "10"]


def client_env(tmp_path, server) -> dict[str, str]:
    # The client's own retries shrunk to none, its requests to 5 s: every outage outlasts them. A
    # temporary folder of its own shows what the training left there.
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {
        **clean_env(tmp_path),
        "MLFLOW_TRACKING_URI": server.uri,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        "TMPDIR": str(tmp_path / "tmp"),
    }


def train(cwd, env, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lipdd", "train", *TINY, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoints(client, proc, count: int) -> str:
    """The run of the training `proc`, once it holds `count` checkpoints."""
    deadline = time.time() + 300
    while True:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if runs and len(list_checkpoints(client, runs[0].info.run_id)) >= count:
            return runs[0].info.run_id
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)


def assert_complete(client, run_id, epochs: int) -> None:
    """FINISHED, every batch loss and evaluation once, every checkpoint."""
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "batch_loss")]
    assert sorted(steps) == list(range(1, epochs * STEPS_PER_EPOCH + 1))
    assert sorted(m.step for m in client.get_metric_history(run_id, "test_error")) == list(
        range(0, epochs + 1, 10)
    )
    assert [e for e, _ in list_checkpoints(client, run_id)] == list(range(0, epochs + 1, 10))


@pytest.fixture
def setup(tmp_path):
    """A server, a working folder and the environment a training there talks to the server with."""
    work = tmp_path / "work"
    work.mkdir()
    with MlflowServer(tmp_path / "server", clean_env(tmp_path)) as server:
        yield server, work, client_env(tmp_path, server), MlflowClient(server.uri)


def test_a_training_outlives_its_tracking_server(setup, tmp_path):
    server, work, env, client = setup
    proc = train(work, env, "--epochs", "150")
    run_id = wait_for_checkpoints(client, proc, 2)
    server.stop()
    down = time.time() * 1000
    time.sleep(8)
    up = time.time() * 1000
    server.start()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "does not answer" in err and "is back after" in err, err
    assert_complete(client, run_id, 150)
    # Logged while the server was away: the training went on.
    stamps = [m.timestamp for m in client.get_metric_history(run_id, "batch_loss")]
    assert any(down < t < up for t in stamps)
    assert not list((tmp_path / "tmp").glob("lipdd-outbox-*"))  # the spool is gone


def test_past_its_outage_limit_a_training_stops_and_the_same_command_resumes_it(setup):
    server, work, env, client = setup
    args = ["--epochs", "100", "--tracking-outage-limit", "2", "--no-system-metrics"]
    proc = train(work, env, *args)
    run_id = wait_for_checkpoints(client, proc, 2)
    server.stop()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    (line,) = [line for line in err.splitlines() if line.startswith("lipdd train: error:")]
    assert "did not answer for" in line and "tracking_outage_limit: 2" in line

    server.start()
    assert client.get_run(run_id).info.status == "RUNNING"  # no one could mark it
    again = train(work, env, *args)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert f"resuming run {run_id}" in err
    assert_complete(client, run_id, 100)


@pytest.mark.parametrize("command", [["train", *TINY], ["stats", "--run-id", "0" * 32], ["report"]])
def test_a_command_whose_server_is_down_says_so_in_one_line_and_does_nothing(tmp_path, command):
    server = MlflowServer(tmp_path / "server", clean_env(tmp_path))  # never started: down
    work = tmp_path / "work"
    work.mkdir()
    env = client_env(tmp_path, server)
    proc = subprocess.run(
        [sys.executable, "-m", "lipdd", *command],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 75, proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert (
        f"the tracking server {server.uri} does not answer" in proc.stderr
        and "run the same command again" in proc.stderr
    )
    assert not any(work.iterdir())  # no data prepared, no result written
