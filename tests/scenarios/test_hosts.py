"""Many hosts, one study, one server that asks who you are (MLflow's basic-auth app): a wrong
password ends a command at once, in one line. With the right one, two clones in folders of their
own ("hosts") train against the server, one directly and one through DVC's queue, whose artifact
root neither can see as a path; they share their experiments through a git remote and analyse each
other's checkpoints, and a third clone, its login inside the URI, draws every host's runs. The
password is written nowhere."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from dvc_repo import LEAN_STATS, Repo, clean_env, make_repo
from lipdd.tracking import list_checkpoints
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


def clone(tmp_path, name: str, remote, env) -> Repo:
    path = tmp_path / name / "project"
    path.parent.mkdir(parents=True, exist_ok=True)
    repo = Repo(path, env)
    Repo(path.parent, env).run("git", "clone", "-q", str(remote), str(path))
    for key, value in (
        ("user.name", name),
        ("user.email", f"{name}@lipdd.invalid"),
        ("commit.gpgsign", "false"),
    ):
        repo.run("git", "config", key, value)
    return repo


def test_two_hosts_log_in_share_one_server_and_a_third_reports(tmp_path, server):
    a = make_repo(tmp_path / "a" / "project", login_env(tmp_path / "a", server), LEAN_STATS)
    remote = tmp_path / "origin.git"
    a.run("git", "init", "-q", "--bare", "--initial-branch", "main", str(remote))
    a.run("git", "remote", "add", "origin", str(remote))
    a.run("git", "push", "-q", "origin", "HEAD:main")
    b = clone(tmp_path, "b", remote, login_env(tmp_path / "b", server))

    # Each host trains a width, A directly and B through the queue, and pushes its experiment
    # (results live in MLflow, so no DVC cache).
    a.run("dvc", "exp", "run", "-n", "width-2", "-S", "width=2")
    b.sweep("width=3", name="width-3")
    for repo, name in ((a, "width-2"), (b, "width-3")):
        repo.run("dvc", "exp", "push", "--no-cache", "origin", name)
        assert not (repo.path / "mlflow.db").exists() and not (repo.path / "mlartifacts").exists()
    run_a = json.loads((a.path / "results/train/run.json").read_text())
    assert run_a["tracking_uri"] == server.uri
    client = as_admin(server)
    runs = client.search_runs([client.get_experiment_by_name("lipdd").experiment_id])
    assert sorted(r.data.params["width"] for r in runs) == ["2", "3"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    trained = client.get_run(run_a["run_id"])
    assert {"test_error", "batch_loss", "train_jacobian_operator_norm_none_mean"} <= set(
        trained.data.metrics
    )
    assert [e for e, _ in list_checkpoints(client, run_a["run_id"])] == [0, 2, 4]
    assert not list(tmp_path.glob("[ab]/**/checkpoints/epoch_*.pt"))  # the server alone has them

    # Host B measures host A's checkpoints, downloaded through the server.
    b.run("lipdd", "stats", "--params", "params.yaml", "--run-id", run_a["run_id"],
          "--metric", "accuracy", "--output-dir", "results/from-a")  # fmt: skip
    assert len(list((b.path / "results/from-a").glob("accuracy-train-checkpoint-*.json"))) >= 1
    assert "train_accuracy_mean" in client.get_run(run_a["run_id"]).data.metrics

    # A third host, its login inside the URI as some clusters hand it out, pulls both experiments
    # and draws every host's runs.
    inside = {
        **clean_env(tmp_path / "c"),
        "MLFLOW_TRACKING_URI": f"http://admin:{PASSWORD}@{server.uri.removeprefix('http://')}",
    }
    c = clone(tmp_path, "c", remote, inside)
    c.run("dvc", "exp", "pull", "--no-cache", "origin", "width-2", "width-3")
    shown = json.loads(c.run("dvc", "exp", "show", "--json").stdout)
    names = {e["name"] for commit in shown for e in (commit.get("experiments") or [])}
    assert {"width-2", "width-3"} <= names
    c.run("lipdd", "report", "--params", "params.yaml")
    with open(c.path / "results/report/by_width.csv") as f:
        assert sorted(int(float(row["width"])) for row in csv.DictReader(f)) == [2, 3]
    assert client.get_experiment_by_name("lipdd-reports") is not None

    # The password is in no file of any host (DVC's queue logs too), the server's store or its
    # artifacts, and in no revision of any repository (experiment refs included).
    for root in (tmp_path / "a", tmp_path / "b", tmp_path / "c", server.root):
        leaked = [p for p in root.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
        assert not leaked
    for repo in (a, b, c, Repo(remote, a.env)):
        revisions = repo.run("git", "rev-list", "--all").stdout.split()
        assert len(revisions) >= 2  # the commit and an experiment's
        assert repo.run("git", "grep", "-F", PASSWORD, *revisions, check=False).returncode == 1
