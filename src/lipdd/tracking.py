"""MLflow: where runs live, params, metric logging that stays off the training's path, checkpoints.

Everything goes through an explicit MlflowClient (no fluent global state), so the same
code serves the training loop, the stats stage and tests that talk to several stores.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

# MLflow 3 sends usage telemetry by default; a cluster job or an offline laptop should not
# open network connections behind the user's back. Checkpoint downloads are many and small:
# their progress bars would drown the output. An explicit setting of either still wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import requests  # noqa: E402
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from .config import ConfigError, TrackingUnavailable  # noqa: E402

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
    """The store's URI, without credentials. A user:password@ in it moves to MLflow's own
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of this process (and so of its children):
    MLflow puts the URI into its error messages, and lipdd into run.json; neither may carry a secret."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{project_root() / 'mlflow.db'}"
    parts = urlsplit(uri)
    if "@" in parts.netloc and "://" in uri:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
        uri = without_credentials(uri)
        if "MLFLOW_TRACKING_URI" in os.environ:
            os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def without_credentials(url: str) -> str:
    """A URL without any user:password@ it carries."""
    parts = urlsplit(url)
    if "://" not in url or "@" not in parts.netloc:
        return url
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=host))


def get_client(uri: str, create: bool = True) -> MlflowClient:
    """A client whose store is ready. MLflow creates a new SQLite store's schema on first use,
    and two processes doing so at once (`dvc queue start -j 2` on a fresh repository) break
    its migration; a file lock beside the database lets one create it while the other waits.
    Readers pass create=False: a store that is not there has moved, and an empty new one
    would only hide that. A server is asked once (check_server)."""
    if not uri.startswith("sqlite:///"):
        client = MlflowClient(tracking_uri=uri)
        if uri.startswith(("http://", "https://")):
            check_server(client)
        return client
    db = Path(uri[len("sqlite:///") :])
    if not create and not db.exists():
        raise ConfigError(
            f"tracking_uri: the MLflow store {db} does not exist; point MLFLOW_TRACKING_URI "
            "(or tracking_uri in params.yaml) at the store that holds the runs"
        )
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # the store (and its schema) exists from here on
    return client


def check_server(client: MlflowClient) -> None:
    """One request before any work: a server that does not answer, or refuses the login, ends the
    command in one line (exit 75 and 2) instead of a traceback after the data is prepared."""
    try:
        client.search_experiments(max_results=1)
    except Exception as e:
        if transient(e):
            raise TrackingUnavailable(
                f"the tracking server {client.tracking_uri} does not answer ({cause(e)}); "
                "start it or point tracking_uri at one, then run the same command again"
            ) from None
        status = e.get_http_status_code() if isinstance(e, MlflowException) else None
        if status not in (401, 403):
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        who = f"user {user!r}" if user else "no user (MLFLOW_TRACKING_USERNAME is not set)"
        raise ConfigError(
            f"tracking_uri: the MLflow server {client.tracking_uri} refused {who} (HTTP {status}); "
            "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        ) from None


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
    source = (
        "sklearn.datasets.load_digits"
        if cfg.data == "digits"
        else str(Path(cfg.data_dir).resolve())
    )
    dataset = Dataset(
        name=f"{cfg.data}-noise{cfg.label_noise:g}",
        digest=dataset_hash[:12],
        source_type="local",
        source=json.dumps({"uri": source, "content_hash": dataset_hash}),
    )
    inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])]
    try:
        client.log_inputs(run_id, inputs)
    except MlflowException:  # queue workers racing to insert the same dataset: one won, link to it
        client.log_inputs(run_id, inputs)


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), MAX_PARAMS):
        client.log_batch(run_id, params=items[i : i + MAX_PARAMS])


def write_metrics(
    client: MlflowClient, run_id: str, rows: list[tuple[str, float, int, int]]
) -> None:
    """(key, value, timestamp ms, step) rows in log_batch calls of at most MAX_METRICS."""
    for i in range(0, len(rows), MAX_METRICS):
        client.log_batch(run_id, metrics=[Metric(*row) for row in rows[i : i + MAX_METRICS]])


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
            self.history[key] = {
                (m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)
            }
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


class BackgroundLogger(MetricLogger):
    """A MetricLogger for the training loop whose writes, checkpoint uploads included, happen in a
    process of its own, in the order they were asked for.

    MLflow's ORM holds the GIL while it writes, so a thread of the trainer would slow a small
    model's steps as much as writing inline (README, Performance). Here the trainer only pickles
    batches of SEND_EVERY rows down a pipe, and saves checkpoints to a spool folder, and a sender
    process writes and uploads them while the training goes on. Order makes a checkpoint safe to
    resume from: it is uploaded after every step logged before it.

    A tracking server that goes away does not stop the training: the sender keeps what it is
    handed (in memory up to Outbox.MEMORY_ROWS rows, then on disk) and retries until the server is
    back, or until `outage_limit` seconds have passed, when the training stops with
    TrackingUnavailable, resumable from its last uploaded checkpoint. Retried writes carry their
    first timestamps, so MLflow stores each metric once.

    The sender is a fresh interpreter (`python -c`): a fork would copy the trainer's threads and
    open database connections, multiprocessing's spawn would re-run a user's script that calls
    train() without a __main__ guard, and its imports overlap the training instead of
    delaying it. It has a session of its own, so Ctrl-C stops only the trainer, whose close()
    still has everything it sent written. A failed write is raised by the trainer's next call."""

    SEND_EVERY = 100  # so a flush waits for ~100 rows, not ~1,000
    STOP_WAIT = (
        60.0  # seconds a trainer that stops on an error waits for what it logged to be written
    )

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        skip_logged: bool = False,
        outage_limit: float = 86400.0,
    ):
        super().__init__(client, run_id, skip_logged)
        self.spool = Path(tempfile.mkdtemp(prefix="lipdd-outbox-"))
        self.pipe, theirs = Pipe()
        # The sender imports this very lipdd, wherever it was imported from. The URI goes through
        # the environment, not argv, which any user of the host can read.
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "from lipdd.tracking import send_to_run; send_to_run(*sys.argv[2:])"
        )
        args = [
            str(Path(__file__).resolve().parent.parent),
            run_id,
            str(theirs.fileno()),
            str(self.spool),
            str(outage_limit),
        ]
        self.sender = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            pass_fds=[theirs.fileno()],
            env={**os.environ, "MLFLOW_TRACKING_URI": client.tracking_uri},
            start_new_session=True,
        )
        theirs.close()

    def send(self) -> None:
        self.sent, rows, self.buffer = time.monotonic(), self.buffer, []
        if rows:
            self._tell(rows)

    def log_checkpoint(self, state: dict, epoch: int) -> None:
        import torch

        path = self.spool / f"epoch_{epoch:04d}.pt"
        torch.save(state, path)
        self.send()
        self._tell(("upload", str(path), "checkpoints"))

    def flush(self) -> None:
        self.send()
        self._tell(_SYNC)
        if (failure := self._answer()) is not None:
            self._fail(failure)

    def close(self, wait: float | None = None) -> None:
        """Everything written, then the sender stopped; with `wait`, at most that many seconds."""
        if self.pipe.closed:
            return
        try:
            if wait is None:
                self.flush()
            else:
                self.send()
        finally:
            with contextlib.suppress(OSError):
                self.pipe.send(None)
            try:
                self.sender.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                self.sender.kill()
                self.sender.wait()
            self.pipe.close()
            shutil.rmtree(self.spool, ignore_errors=True)

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # the error under way is the one to report
            self.close(wait=0 if kind is TrackingUnavailable else self.STOP_WAIT)

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
        unavailable = f"{TrackingUnavailable.__name__}: "
        if failure.startswith(unavailable):
            raise TrackingUnavailable(failure[len(unavailable) :])
        raise MlflowException(f"writing metrics to run {self.run_id} failed: {failure}")


class Outbox:
    """The sender's queue: what the trainer handed it, in order. Row batches stay in memory up to
    MEMORY_ROWS rows, past that they wait in the spool folder as files. A thread fills it from the
    pipe, so the trainer never waits for a write, however long the server is away."""

    MEMORY_ROWS = 200_000

    def __init__(self, spool: Path):
        self.spool, self.items, self.rows_in_memory, self.spilled = spool, deque(), 0, 0
        self.ready = threading.Condition()
        self.trainer_gone = False

    def receive(self, pipe: Connection) -> None:
        try:
            while (message := pipe.recv()) is not None:
                self.put(message)
        except (EOFError, OSError):
            self.trainer_gone = True
        self.put(None)

    def put(self, message) -> None:
        with self.ready:
            if isinstance(message, list) and self.rows_in_memory + len(message) > self.MEMORY_ROWS:
                path = self.spool / f"rows-{self.spilled:08d}.pkl"
                self.spilled += 1
                path.write_bytes(pickle.dumps(message))
                message = ("rows", str(path))
            elif isinstance(message, list):
                self.rows_in_memory += len(message)
            self.items.append(message)
            self.ready.notify()

    def take(self):
        with self.ready:
            while not self.items:
                self.ready.wait()
            item = self.items.popleft()
            if isinstance(item, list):
                self.rows_in_memory -= len(item)
            return item


def transient(error: Exception) -> bool:
    """Whether a failed call may succeed later: no answer, a timeout, a server error or a rate
    limit; not a refusal of the request itself (a bad metric, a deleted run, a login)."""
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status in (408, 429)
    return isinstance(error, (ConnectionError, TimeoutError, requests.exceptions.RequestException))


def cause(error: Exception) -> str:
    """A failed request's reason in a few words: MLflow's messages end with the root cause."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return reason if len(reason) < 160 else "..." + reason[-150:]


class Patience:
    """Retries a call while the server is away, for at most `limit` seconds of outage in a row, and
    says on stderr when an outage starts and ends."""

    def __init__(self, uri: str, spool: Path, limit: float):
        self.uri, self.spool, self.limit, self.down_since = uri, spool, limit, None

    def call(self, action, give_up_now=lambda: False) -> None:
        pause = 1.0
        while True:
            try:
                action()
            except Exception as e:
                if not transient(e) or give_up_now():
                    raise
                now = time.monotonic()
                if self.down_since is None:
                    self.down_since = now
                    print(
                        f"lipdd: the tracking server {self.uri} does not answer ({cause(e)}); the training goes on "
                        f"and its metrics and checkpoints wait in {self.spool}, for up to {self.limit:g} s",
                        file=sys.stderr,
                        flush=True,
                    )
                if now - self.down_since > self.limit:
                    raise TrackingUnavailable(
                        f"the tracking server {self.uri} did not answer for {now - self.down_since:.0f} s "
                        f"(tracking_outage_limit: {self.limit:g}); the run stays resumable from its last "
                        "uploaded checkpoint: run the same command again once the server is back"
                    ) from None
                time.sleep(pause)
                pause = min(2 * pause, 30.0)
            else:
                if self.down_since is not None:
                    print(
                        f"lipdd: the tracking server {self.uri} is back after "
                        f"{time.monotonic() - self.down_since:.0f} s; writing what waited",
                        file=sys.stderr,
                        flush=True,
                    )
                    self.down_since = None
                return


def send_to_run(run_id: str, fd: str, spool: str, outage_limit: str) -> None:
    """The sender process of a BackgroundLogger: writes each batch of rows and uploads each file
    that arrives on the pipe at file descriptor fd, in order; answers _SYNC once everything before
    it is done; stops at None, at its first failure (after reporting it), or when the trainer is
    gone and everything it handed over is written (or the server fails once)."""
    pipe = Connection(int(fd))
    outbox = Outbox(Path(spool))
    threading.Thread(target=outbox.receive, args=(pipe,), daemon=True).start()
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    patience = Patience(client.tracking_uri, outbox.spool, float(outage_limit))
    give_up = lambda: outbox.trainer_gone  # noqa: E731
    try:
        while (item := outbox.take()) is not None:
            if item == _SYNC:
                pipe.send(None)
            elif isinstance(item, list):
                patience.call(lambda: write_metrics(client, run_id, item), give_up)
            elif item[0] == "rows":
                rows = pickle.loads(Path(item[1]).read_bytes())
                patience.call(lambda: write_metrics(client, run_id, rows), give_up)
                os.unlink(item[1])
            else:  # ("upload", path, artifact folder)
                patience.call(lambda: client.log_artifact(run_id, item[1], item[2]), give_up)
                os.unlink(item[1])
    except Exception as e:
        with contextlib.suppress(OSError):  # unless the trainer is gone too
            pipe.send(f"{type(e).__name__}: {e}")
    shutil.rmtree(outbox.spool, ignore_errors=True)  # a trainer killed by SIGKILL cannot remove it
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
            raise CheckpointError(
                f"checkpoint {artifact} of run {run_id} cannot be loaded safely: {reason[:300]}"
            ) from None


class CheckpointError(ConfigError):
    """A checkpoint that is corrupted, truncated or carries code; never loaded."""
