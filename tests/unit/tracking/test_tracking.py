"""The training loop's metric logger against a real SQLite store: what it is handed reaches the
run by each flush, and a sender that fails or dies is reported, never waited for forever."""

import pickle
import subprocess
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from lipdd import config, runs, tracking
from lipdd.tracking import BackgroundLogger, get_client


@pytest.fixture
def run(workdir):
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    return client, client.create_run("0").info.run_id


def history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_every_metric_is_in_the_run_at_each_flush_and_at_close(run):
    client, run_id = run
    with BackgroundLogger(client, run_id) as logger:
        for step in range(1, 251):  # more than two sends' worth
            logger.log("batch_loss", step / 8, step)
        logger.log_dict({"train_loss": 0.5, "lr": 0.1}, step=10)
        logger.flush()
        assert history(client, run_id, "batch_loss") == [(s, s / 8) for s in range(1, 251)]
        assert history(client, run_id, "lr") == [(10, 0.1)]
        logger.log("batch_loss", 7.0, 251)
    assert history(client, run_id, "batch_loss")[-1] == (251, 7.0)
    assert logger.sender.returncode == 0


def test_a_resumed_run_is_sent_only_steps_it_lacks(run):
    client, run_id = run
    with BackgroundLogger(client, run_id) as logger:
        for step in range(1, 6):
            logger.log("batch_loss", float(step), step)
    with BackgroundLogger(client, run_id, skip_logged=True) as logger:
        for step in range(1, 9):
            logger.log("batch_loss", float(step), step)
    assert history(client, run_id, "batch_loss") == [(s, float(s)) for s in range(1, 9)]


def test_a_failed_write_is_raised_by_the_next_flush(run):
    client, run_id = run
    logger = BackgroundLogger(client, run_id)
    logger.log("../outside", 1.0, 0)  # MLflow refuses a metric name that climbs out of the run
    with pytest.raises(
        MlflowException, match=rf"writing metrics to run {run_id} failed: MlflowException: .*name"
    ):
        logger.flush()
    with pytest.raises(MlflowException, match="name"):  # and by each flush after it
        logger.close()
    assert logger.pipe.closed and logger.sender.returncode == 0


def test_a_checkpoint_saved_after_a_failure_reports_the_failure(run):
    """The trainer learns of a failure only at its next call, which may be saving a checkpoint
    into the spool: the spool stays until the trainer hangs up."""
    client, run_id = run
    logger = BackgroundLogger(client, run_id)
    logger.log("../outside", 1.0, 0)
    logger.send()
    assert logger.pipe.poll(timeout=60)  # the sender has failed and said so
    with pytest.raises(subprocess.TimeoutExpired):
        logger.sender.wait(timeout=1)
    with pytest.raises(MlflowException, match="name"):
        logger.log_checkpoint({"epoch": 0}, 0)
    with pytest.raises(MlflowException, match="name"):
        logger.close()
    assert logger.sender.returncode == 0 and not logger.spool.exists()


def test_a_killed_sender_is_reported(run):
    client, run_id = run
    logger = BackgroundLogger(client, run_id)
    logger.sender.kill()
    logger.sender.wait()
    logger.log("batch_loss", 1.0, 1)
    with pytest.raises(MlflowException, match="exited with status -9"):
        logger.flush()


def test_the_sender_ends_when_the_trainer_is_gone(run):
    client, run_id = run
    logger = BackgroundLogger(client, run_id)
    logger.pipe.close()  # what the trainer's death does to the pipe
    assert logger.sender.wait(timeout=60) == 0
    assert not logger.spool.exists()  # nor does it leave its spool behind


def test_the_sender_runs_the_trainers_own_lipdd(run, tmp_path, monkeypatch):
    """Not whichever lipdd the environment would import first."""
    impostor = tmp_path / "impostor" / "lipdd"
    impostor.mkdir(parents=True)
    (impostor / "__init__.py").write_text("raise ImportError('the wrong lipdd')\n")
    monkeypatch.setenv("PYTHONPATH", str(impostor.parent))
    client, run_id = run
    with BackgroundLogger(client, run_id) as logger:
        logger.log("batch_loss", 0.5, 1)
    assert history(client, run_id, "batch_loss") == [(1, 0.5)]


@pytest.mark.parametrize(
    "url, tagged",
    [
        ("https://user:s3cret@github.com/o/r.git", "https://github.com/o/r.git"),
        ("https://s3cret@host.example:8443/r", "https://host.example:8443/r"),
        (
            "git@github.com:o/r.git",
            "git@github.com:o/r.git",
        ),  # scp-like: the user is an ssh login, no secret
        ("/srv/git/r", "/srv/git/r"),
    ],
)
def test_the_remote_url_a_run_is_tagged_with_carries_no_credentials(url, tagged):
    assert tracking.without_credentials(url) == tagged


def test_runs_of_the_same_data_share_one_mlflow_dataset(workdir):
    """The second run links the dataset the first inserted (queue workers race to insert it: the
    loser retries and links)."""
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    cfg = config.build({"label_noise": 0.3}, environ={})
    started = [runs.start(client, cfg, "ab" * 32, 10) for _ in range(2)]
    for run_id in started:
        (given,) = client.get_run(run_id).inputs.dataset_inputs
        assert (given.dataset.name, given.dataset.digest) == ("digits-noise0.3", "ab" * 6)
        assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "training")]
        client.set_terminated(run_id)


def test_the_sender_keeps_a_bounded_backlog_in_memory_and_the_rest_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking.Outbox, "MEMORY_ROWS", 250)
    outbox = tracking.Outbox(tmp_path)
    batches = [
        [("batch_loss", float(s), 0, s) for s in range(i, i + 100)] for i in range(0, 500, 100)
    ]
    for rows in batches:
        outbox.put(rows)
    assert outbox.rows_in_memory == 200 and len(list(tmp_path.glob("rows-*.pkl"))) == 3
    taken = [outbox.take() for _ in batches]
    assert taken[:2] == batches[:2] and outbox.rows_in_memory == 0
    assert [pickle.loads(Path(path).read_bytes()) for kind, path in taken[2:]] == batches[2:]


@pytest.mark.parametrize(
    "error, retried",
    [
        (
            MlflowException("no answer", error_code=databricks_pb2.INTERNAL_ERROR),
            True,
        ),  # what the client raises with no server
        (MlflowException("busy", error_code=databricks_pb2.TEMPORARILY_UNAVAILABLE), True),
        (MlflowException("slow down", error_code=databricks_pb2.RESOURCE_EXHAUSTED), True),
        (MlflowException("bad metric", error_code=databricks_pb2.INVALID_PARAMETER_VALUE), False),
        (MlflowException("who are you", error_code=databricks_pb2.UNAUTHENTICATED), False),
        (MlflowException("deleted run", error_code=databricks_pb2.RESOURCE_DOES_NOT_EXIST), False),
        (ConnectionRefusedError(), True),
        (ValueError("a bug"), False),
    ],
)
def test_only_failures_that_may_pass_are_retried(error, retried):
    assert tracking.transient(error) is retried
