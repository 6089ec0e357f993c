"""A tracking server that asks who you are (MLflow's basic-auth app): a wrong password ends a
command
at once, in one line; the right one works for the pipeline and the queue, whether it comes in
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or inside the URI, and is written nowhere."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from dvc_repo import LEAN_STATS, clean_env, make_repo
from mlflow_server import MlflowServer

PASSWORD = "lipdd-Pa55word-never-written"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    # MLflow's own settings, but with its login cache on: without it every request pays a PBKDF2
    # hash, which makes the pipeline about twice as slow (docs/scaling.md).
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        "database_uri = sqlite:///basic_auth.db\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 600\n"
    )
    env = {
        **clean_env(root),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "lipdd-tests-flask-key",
        "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
    }
    with MlflowServer(root / "server", env, app_name="basic-auth") as server:
        yield server


def as_admin(server) -> MlflowClient:
    return MlflowClient(f"http://admin:{PASSWORD}@{server.uri.removeprefix('http://')}")


def login_env(tmp_path, server, password=PASSWORD) -> dict[str, str]:
    return {
        **clean_env(tmp_path),
        "MLFLOW_TRACKING_URI": server.uri,
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": password,
    }


def test_a_wrong_password_is_one_line_and_status_2_before_any_training(tmp_path, server):
    wrong = "not-the-Pa55word"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lipdd",
            "train",
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--name",
            "wrong-login",
        ],
        cwd=tmp_path,
        env=login_env(tmp_path, server, wrong),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"lipdd train: error: tracking_uri: the MLflow server {server.uri} refused user 'admin' "
        "(HTTP 401); check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    ]
    assert as_admin(server).get_experiment_by_name("wrong-login") is None
    assert not (tmp_path / "data").exists()  # nothing prepared, nothing trained


def test_a_password_in_a_params_file_is_refused_without_echoing_it(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lipdd",
            "train",
            "--tracking-uri",
            f"http://admin:{PASSWORD}@127.0.0.1:1",
        ],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "tracking_uri: holds a password" in proc.stderr and PASSWORD not in proc.stderr


def test_the_pipeline_and_the_queue_log_in_and_write_the_password_nowhere(tmp_path, server):
    repo = make_repo(tmp_path / "project", login_env(tmp_path, server), LEAN_STATS)
    repo.sweep("width=3")  # the whole pipeline, through the queue
    # The login inside the URI, as some clusters hand it out: the same, and kept out of files too.
    inside = {
        **clean_env(tmp_path),
        "MLFLOW_TRACKING_URI": f"http://admin:{PASSWORD}@{server.uri[7:]}",
    }
    repo.run("lipdd", "report", "--params", "params.yaml", env=inside)

    client = as_admin(server)
    experiment = client.get_experiment_by_name("lipdd")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.data.params["width"] for r in runs] == ["3"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert client.get_experiment_by_name("lipdd-reports") is not None

    for root in (
        repo.path,
        server.root,
    ):  # the repository (DVC's queue logs too), the store, the artifacts
        leaked = [p for p in root.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
        assert not leaked
    revisions = repo.run("git", "rev-list", "--all").stdout.split()  # experiment refs included
    assert len(revisions) >= 2  # the commit and the experiment's
    assert repo.run("git", "grep", "-F", PASSWORD, *revisions, check=False).returncode == 1
