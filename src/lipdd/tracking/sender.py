"""The training's MLflow writes in a process of its own (BackgroundLogger), and what keeps them
going through an outage of the tracking server (Outbox, Patience)."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, Pipe
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..errors import TrackingUnavailable
from .store import MetricLogger, cause, transient, write_metrics

_SYNC = "sync"  # asks the sender to answer once everything before it is written


class BackgroundLogger(MetricLogger):
    """A MetricLogger for the training loop whose writes, checkpoint uploads included, happen in a
    process of its own, in the order they were asked for.

    MLflow's ORM holds the GIL while it writes, so a thread of the trainer would slow a small
    model's steps as much as writing inline (docs/performance.md). Here the trainer only pickles
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
        # A scheduler's warning (SIGUSR1, lipdd.train) is the trainer's to act on: the sender
        # ignores it from its first line and writes on until the trainer stops.
        code = (
            "import signal; signal.signal(signal.SIGUSR1, signal.SIG_IGN); "
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "from lipdd.tracking.sender import send_to_run; send_to_run(*sys.argv[2:])"
        )
        args = [
            str(Path(__file__).resolve().parents[2]),
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
                        f"lipdd: the tracking server {self.uri} does not answer ({cause(e)}); the "
                        f"training goes on and its metrics and checkpoints wait in {self.spool}, "
                        f"for up to {self.limit:g} s",
                        file=sys.stderr,
                        flush=True,
                    )
                if now - self.down_since > self.limit:
                    raise TrackingUnavailable(
                        f"the tracking server {self.uri} did not answer for "
                        f"{now - self.down_since:.0f} s (tracking_outage_limit: {self.limit:g}); "
                        "the run stays resumable from its last uploaded checkpoint: run the same "
                        "command again once the server is back"
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
    it is done; stops at None, or when the trainer is gone and everything it handed over is
    written (or the server fails once). After a failure it only reports it, until the trainer
    hangs up."""
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
        # The trainer may be saving a checkpoint into the spool until it reads the failure, which
        # each of its later flushes hears again: the sender stays until the trainer hangs up.
        failure = f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):  # unless the trainer is gone too
            pipe.send(failure)
            while (item := outbox.take()) is not None:
                if item == _SYNC:
                    pipe.send(failure)
    shutil.rmtree(outbox.spool, ignore_errors=True)  # a trainer killed by SIGKILL cannot remove it
    # Every write is committed: skip tearing down MLflow's import graph, which the trainer's
    # close() would wait for.
    os._exit(0)
