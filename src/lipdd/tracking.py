"""MLflow: where runs live, params, metric logging that stays off the training's path, checkpoints.

Everything goes through an explicit MlflowClient (no fluent global state), so the same
code serves the training loop, the stats stage and tests that talk to several stores.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import Any

# MLflow 3 sends usage telemetry by default; a cluster job or an offline laptop should not
# open network connections behind the user's back. Checkpoint downloads are many and small:
# their progress bars would drown the output. An explicit setting of either still wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from .config import ConfigError  # noqa: E402

# MLflow's per-call limits for log_batch.
MAX_METRICS, MAX_PARAMS = 1000, 100


def project_root() -> Path:
    """The workspace root. DVC sets DVC_ROOT for stage commands, and queued experiments run
    in temporary copies under .dvc/tmp/exps: DVC_ROOT still names the real workspace, so
    every run lands in the same store."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").exists() or (d / ".dvc").is_dir():
            return d
    return here


def tracking_uri(configured: str | None = None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{project_root() / 'mlflow.db'}"


def get_client(uri: str, create: bool = True) -> MlflowClient:
    """A client whose store is ready. MLflow creates a new SQLite store's schema on first use,
    and two processes doing so at once (`dvc queue start -j 2` on a fresh repository) break
    its migration; a file lock beside the database lets one create it while the other waits.
    Readers pass create=False: a store that is not there has moved, and an empty new one
    would only hide that."""
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    db = Path(uri[len("sqlite:///"):])
    if not create and not db.exists():
        raise ConfigError(f"tracking_uri: the MLflow store {db} does not exist; point MLFLOW_TRACKING_URI "
                          "(or tracking_uri in params.yaml) at the store that holds the runs")
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # the store (and its schema) exists from here on
    return client


# MLflow's UI opens an experiment of this kind on its runs, not on the GenAI overview of traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: MlflowClient, name: str) -> str:
    """Get or create the experiment, of EXPERIMENT_KIND. With a local SQLite store MLflow would
    otherwise fix the artifact location to <cwd>/mlruns at creation, a folder DVC deletes when the
    creating run was a queued experiment; so local stores get an absolute location at the root."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        for key, value in EXPERIMENT_KIND.items():
            if exp.tags.get(key) != value:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        location = (project_root() / "mlartifacts" / safe).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException:  # created meanwhile by a concurrent worker
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def log_dataset(client: MlflowClient, run_id: str, cfg, dataset_hash: str) -> None:
    """The training data as an MLflow dataset input (the UI's Datasets column and filter): named
    by source and label noise, its digest the prepared data's content hash."""
    source = ("sklearn.datasets.load_digits" if cfg.data == "digits" else str(Path(cfg.data_dir).resolve()))
    dataset = Dataset(name=f"{cfg.data}-noise{cfg.label_noise:g}", digest=dataset_hash[:12], source_type="local",
                      source=json.dumps({"uri": source, "content_hash": dataset_hash}))
    inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])]
    try:
        client.log_inputs(run_id, inputs)
    except MlflowException:  # queue workers racing to insert the same dataset: one won, link to it
        client.log_inputs(run_id, inputs)


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), MAX_PARAMS):
        client.log_batch(run_id, params=items[i:i + MAX_PARAMS])


def write_metrics(client: MlflowClient, run_id: str, rows: list[tuple[str, float, int, int]]) -> None:
    """(key, value, timestamp ms, step) rows in log_batch calls of at most MAX_METRICS."""
    for i in range(0, len(rows), MAX_METRICS):
        client.log_batch(run_id, metrics=[Metric(*row) for row in rows[i:i + MAX_METRICS]])


class MetricLogger:
    """Buffers metrics and writes them with log_batch, one call per 1,000 metrics or per
    SEND_SECONDS (so the UI stays live): one log_metric call per metric costs many times more
    against a SQL store. flush() returns once everything logged is in the store. A context
    manager: leaving it flushes."""

    SEND_EVERY, SEND_SECONDS = MAX_METRICS, 30.0

    def __init__(self, client: MlflowClient, run_id: str, skip_logged: bool = False):
        self.client, self.run_id, self.buffer, self.history = client, run_id, [], {}
        self.sent = time.monotonic()
        # With skip_logged, steps the run already holds for a key are not sent again. The run's
        # latest value of each key is the one at its highest step: no history is read (a CIFAR
        # run holds millions of batch losses).
        self.last_step: dict[str, int] = {}
        if skip_logged:
            self.last_step = {m.key: m.step for m in client.get_run(run_id).data.to_proto().metrics}

    def holds(self, key: str, step: int, value: float) -> bool:
        """Whether the run already has exactly `value` at `step` for `key`."""
        if key not in self.history:
            self.history[key] = {(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)}
        return (int(step), float(value)) in self.history[key]

    def log(self, key: str, value: float, step: int) -> None:
        if step <= self.last_step.get(key, -1):
            return
        self.buffer.append((key, float(value), int(time.time() * 1000), int(step)))
        if len(self.buffer) >= self.SEND_EVERY or time.monotonic() - self.sent > self.SEND_SECONDS:
            self.send()

    def log_dict(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.log(key, value, step)

    def send(self) -> None:
        """Hands the buffer on to be written."""
        self.sent, rows, self.buffer = time.monotonic(), self.buffer, []
        write_metrics(self.client, self.run_id, rows)

    def flush(self) -> None:
        self.send()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # the error under way is the one to report
            self.close()


_SYNC = "sync"  # asks the sender to answer once everything before it is written


class BackgroundMetricLogger(MetricLogger):
    """A MetricLogger whose writes happen in a process of its own, for the training loop.

    MLflow's ORM holds the GIL while it writes, so a thread of the trainer would slow a small
    model's steps as much as writing inline (README, Performance). Here the trainer only pickles
    batches of SEND_EVERY rows down a pipe, and a sender process writes them while the training
    goes on.

    The sender is a fresh interpreter (`python -c`): a fork would copy the trainer's threads and
    open database connections, multiprocessing's spawn would re-run a user's script that calls
    train() without a __main__ guard, and its imports overlap the training instead of
    delaying it. It has a session of its own, so Ctrl-C stops only the trainer, whose close()
    still has everything it sent written. A failed write is raised by the trainer's next call."""

    SEND_EVERY = 100  # so a flush before a checkpoint waits for ~100 rows, not ~1,000

    def __init__(self, client: MlflowClient, run_id: str, skip_logged: bool = False):
        super().__init__(client, run_id, skip_logged)
        self.pipe, theirs = Pipe()
        # The sender imports this very lipdd, wherever it was imported from.
        code = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from lipdd.tracking import send_metrics; send_metrics(*sys.argv[2:])")
        args = [str(Path(__file__).resolve().parent.parent), client.tracking_uri, run_id, str(theirs.fileno())]
        self.sender = subprocess.Popen([sys.executable, "-c", code, *args], pass_fds=[theirs.fileno()],
                                       start_new_session=True)
        theirs.close()

    def send(self) -> None:
        self.sent, rows, self.buffer = time.monotonic(), self.buffer, []
        if rows:
            self._tell(rows)

    def flush(self) -> None:
        self.send()
        self._tell(_SYNC)
        if (failure := self._answer()) is not None:
            self._fail(failure)

    def close(self) -> None:
        if self.pipe.closed:
            return
        try:
            self.flush()
        finally:
            with contextlib.suppress(OSError):
                self.pipe.send(None)
            self.sender.wait()
            self.pipe.close()

    def _tell(self, message) -> None:
        try:
            if self.pipe.poll():  # the sender speaks unasked only to say it failed
                self._fail(self._answer())
            self.pipe.send(message)
        except (BrokenPipeError, ConnectionResetError):
            self._fail(self._answer())

    def _answer(self) -> str | None:
        """The sender's next word: None once all is written, else what went wrong."""
        try:
            return self.pipe.recv()
        except (EOFError, ConnectionResetError):
            return f"the sender process exited with status {self.sender.wait()}"

    def _fail(self, failure: str):
        raise MlflowException(f"writing metrics to run {self.run_id} failed: {failure}")



def send_metrics(uri: str, run_id: str, fd: str) -> None:
    """The sender process of a BackgroundMetricLogger: writes each batch of rows that arrives
    on the pipe at file descriptor fd, answers _SYNC once everything before it is written, and
    stops at None, at its first failure (after reporting it), or when the trainer is gone."""
    pipe = Connection(int(fd))
    client = MlflowClient(tracking_uri=uri)
    try:
        while (message := pipe.recv()) is not None:
            if message == _SYNC:
                pipe.send(None)
            else:
                write_metrics(client, run_id, message)
    except EOFError:
        pass
    except Exception as e:
        with contextlib.suppress(OSError):  # unless the trainer is gone too
            pipe.send(f"{type(e).__name__}: {e}")
    # Every write is committed: skip tearing down MLflow's import graph, which the trainer's
    # close() would wait for.
    os._exit(0)


# --- checkpoints: artifacts checkpoints/epoch_NNNN.pt of a training run ---------------------

def list_checkpoints(client: MlflowClient, run_id: str) -> list[tuple[int, str]]:
    """(epoch, artifact path) of every checkpoint of the run, by epoch."""
    found = []
    for item in client.list_artifacts(run_id, "checkpoints"):
        m = re.fullmatch(r"checkpoints/epoch_(\d+)\.pt", item.path)
        if m:
            found.append((int(m.group(1)), item.path))
    return sorted(found)


def log_checkpoint(client: MlflowClient, run_id: str, state: dict, epoch: int) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"epoch_{epoch:04d}.pt"
        torch.save(state, path)
        client.log_artifact(run_id, str(path), "checkpoints")


def load_checkpoint(client: MlflowClient, run_id: str, artifact: str, device="cpu") -> dict:
    """A checkpoint as plain tensors and containers. weights_only=True refuses any pickled
    object that would run code on load: checkpoints may come from other people."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, artifact, tmp)
        try:
            return torch.load(local, map_location=device, weights_only=True)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint {artifact} of run {run_id} cannot be loaded safely: "
                                  f"{reason[:300]}") from None


class CheckpointError(ConfigError):
    """A checkpoint that is corrupted, truncated or carries code; never loaded."""
