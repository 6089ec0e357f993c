"""MLflow: the store and its runs (store), the training's writes in a process of their own
(sender), checkpoints as artifacts (checkpoints). Everything goes through an explicit
MlflowClient (no fluent global state), so the same code serves the training loop, the stats
stage and tests that talk to several stores."""

import os

# MLflow 3 sends usage telemetry by default; a cluster job or an offline laptop should not
# open network connections behind the user's back. Checkpoint downloads are many and small:
# their progress bars would drown the output. An explicit setting of either still wins. Set
# here, before any module of the package imports mlflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# ruff: noqa: E402

from .checkpoints import list_checkpoints, load_checkpoint, log_checkpoint
from .sender import BackgroundLogger, Outbox, Patience, send_to_run
from .store import (
    MAX_METRICS,
    MAX_PARAMS,
    MetricLogger,
    check_server,
    experiment_id,
    get_client,
    log_dataset,
    log_params,
    project_root,
    tracking_uri,
    transient,
    without_credentials,
    write_metrics,
)

__all__ = [
    "BackgroundLogger",
    "MAX_METRICS",
    "MAX_PARAMS",
    "MetricLogger",
    "Outbox",
    "Patience",
    "check_server",
    "experiment_id",
    "get_client",
    "list_checkpoints",
    "load_checkpoint",
    "log_checkpoint",
    "log_dataset",
    "log_params",
    "project_root",
    "send_to_run",
    "tracking_uri",
    "transient",
    "without_credentials",
    "write_metrics",
]
