"""Shared fixtures: a fresh working directory with its own real MLflow store."""

import shutil

import pytest
from mlflow.tracking import MlflowClient


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """An MLflow SQLite database with its schema migrated once: creating one costs seconds,
    copying it costs nothing, and each test still gets a real store of its own."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch, empty_store):
    """A fresh cwd whose default store <tmp>/mlflow.db exists and whose data lands in <tmp>/data."""
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return tmp_path
