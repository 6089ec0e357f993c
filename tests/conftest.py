"""Shared fixtures: a fresh working directory with its own real MLflow store, and a tiny trained run
to measure."""

import getpass
import os
import shutil
import tempfile

import pytest
from mlflow.tracking import MlflowClient

from tiny import TINY_RUN

# torch.compile's kernel cache does not key on the instruction set ATen and oneDNN are held to:
# under ATEN_CPU_CAPABILITY=avx2 a kernel cached by a native run crashes the process. Each
# setting gets a cache of its own.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(
        tempfile.gettempdir(),
        f"torchinductor_{getpass.getuser()}",
        f"aten-{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"
        f"-onednn-{os.environ.get('ONEDNN_MAX_CPU_ISA', 'native')}",
    ),
)


# `make test` hands whole files to its workers in collection order (--no-loadscope-reorder): the
# files that run longest go first, so that none of them is left running alone at the end.
LONGEST = (
    "test_pipeline.py",
    "test_slurm.py",
    "test_hosts.py",
    "test_wheelhouse.py",
    "test_robustness.py",
    "test_outage.py",
    "test_distributed.py",
    "test_train.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))  # stable: file order kept


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


@pytest.fixture(scope="session")
def tiny_run_once(tmp_path_factory, empty_store):
    """TINY_RUN trained once per worker, in a project folder of its own."""
    from lipdd import config, train

    project = tmp_path_factory.mktemp("tiny_run")
    shutil.copy(empty_store, project / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
            mp.delenv(var, raising=False)
        run_id = train.train(config.build(TINY_RUN, environ={}))
    return project, run_id


@pytest.fixture
def tiny_run(tiny_run_once, workdir):
    """The id of TINY_RUN, its store and prepared data copied into this test's working directory.
    Its artifacts stay in the session's folder (the store names them there): a test may add to them
    (stats tables), never rely on what another test added."""
    project, run_id = tiny_run_once
    shutil.copytree(
        project, workdir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("mlartifacts")
    )
    return run_id
