"""The stats stage: measure chosen checkpoints of a training run, pulled from MLflow by run id
(compute), write each checkpoint's results (writer), join the shards of --skip jobs (shards)."""

from .compute import compute_stats, list_checkpoints, merge

__all__ = ["compute_stats", "list_checkpoints", "merge"]
