"""Checkpoints of a training run: its MLflow artifacts checkpoints/epoch_NNNN.pt."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from ..errors import CheckpointError


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
