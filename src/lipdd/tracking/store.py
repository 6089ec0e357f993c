"""MLflow: where runs live, their params, and metric logging in the caller's process.

Everything goes through an explicit MlflowClient (no fluent global state), so the same
code serves the training loop, the stats stage and tests that talk to several stores.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .. import names
from ..errors import ConfigError, TrackingUnavailable

# MLflow's per-call limits for log_batch.
MAX_METRICS, MAX_PARAMS = 1000, 100


def project_root() -> Path:
    """The workspace root. DVC sets DVC_ROOT for stage commands, and queued experiments run
    in temporary copies under .dvc/tmp/exps: DVC_ROOT still names the real workspace, so
    every run lands in the same store. LIPDD_ROOT, set by `lipdd sweep` for the jobs it runs in
    clones of the project, names the project over both."""
    if os.environ.get("LIPDD_ROOT"):
        return Path(os.environ["LIPDD_ROOT"]).resolve()
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
    MLflow puts the URI into its error messages, and lipdd into run.json; neither may carry a
    secret."""
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
            f"tracking_uri: the MLflow store {db} does not exist; point MLFLOW_TRACKING_URI (or "
            "tracking_uri in params.yaml) at the store that holds the runs"
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
                f"the tracking server {client.tracking_uri} does not answer ({cause(e)}); start "
                "it or point tracking_uri at one, then run the same command again"
            ) from None
        status = e.get_http_status_code() if isinstance(e, MlflowException) else None
        if status not in (401, 403):
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        who = f"user {user!r}" if user else "no user (MLFLOW_TRACKING_USERNAME is not set)"
        raise ConfigError(
            f"tracking_uri: the MLflow server {client.tracking_uri} refused {who} (HTTP "
            f"{status}); check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
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
        if key in names.OVERVIEW:
            self.log(names.OVERVIEW_PREFIX + key, value, step)
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
