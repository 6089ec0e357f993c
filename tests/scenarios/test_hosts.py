"""Many hosts, one study: two clones in folders of their own ("hosts") train against one `mlflow
server` whose artifact root neither can see as a path, share their experiments through a git remote,
analyse each other's checkpoints, and a third clone draws every host's runs."""

from __future__ import annotations

import csv
import json

from mlflow.tracking import MlflowClient

from dvc_repo import LEAN_STATS, Repo, clean_env, make_repo
from lipdd.tracking import list_checkpoints
from mlflow_server import MlflowServer


def host(tmp_path, name: str, server) -> dict[str, str]:
    return {**clean_env(tmp_path / name), "MLFLOW_TRACKING_URI": server.uri}


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


def test_two_hosts_one_server_and_a_third_that_reports(tmp_path):
    with MlflowServer(tmp_path / "server", clean_env(tmp_path)) as server:
        a = make_repo(tmp_path / "a" / "project", host(tmp_path, "a", server), LEAN_STATS)
        remote = tmp_path / "origin.git"
        a.run("git", "init", "-q", "--bare", "--initial-branch", "main", str(remote))
        a.run("git", "remote", "add", "origin", str(remote))
        a.run("git", "push", "-q", "origin", "HEAD:main")
        b = clone(tmp_path, "b", remote, host(tmp_path, "b", server))

        # Each host trains a width and pushes its experiment (results live in MLflow, so no DVC
        # cache).
        for repo, width in ((a, 2), (b, 3)):
            repo.run("dvc", "exp", "run", "-n", f"width-{width}", "-S", f"width={width}")
            repo.run("dvc", "exp", "push", "--no-cache", "origin", f"width-{width}")
            assert (
                not (repo.path / "mlflow.db").exists() and not (repo.path / "mlartifacts").exists()
            )
        run_a = json.loads((a.path / "results/train/run.json").read_text())
        assert run_a["tracking_uri"] == server.uri
        client = MlflowClient(server.uri)
        trained = client.get_run(run_a["run_id"])
        assert trained.info.status == "FINISHED"
        assert {"test_error", "batch_loss", "train_jacobian_operator_norm_none_mean"} <= set(
            trained.data.metrics
        )
        assert [e for e, _ in list_checkpoints(client, run_a["run_id"])] == [0, 2, 4]
        assert not list(
            tmp_path.glob("[ab]/**/checkpoints/epoch_*.pt")
        )  # the server alone holds them

        # Host B measures host A's checkpoints, downloaded through the server.
        b.run(
            "lipdd",
            "stats",
            "--params",
            "params.yaml",
            "--run-id",
            run_a["run_id"],
            "--metric",
            "accuracy",
            "--output-dir",
            "results/from-a",
        )
        assert len(list((b.path / "results/from-a").glob("accuracy-train-checkpoint-*.json"))) >= 1
        assert "train_accuracy_mean" in client.get_run(run_a["run_id"]).data.metrics

        # A third host pulls both experiments and draws every host's runs.
        c = clone(tmp_path, "c", remote, host(tmp_path, "c", server))
        c.run("dvc", "exp", "pull", "--no-cache", "origin", "width-2", "width-3")
        shown = json.loads(c.run("dvc", "exp", "show", "--json").stdout)
        names = {e["name"] for commit in shown for e in (commit.get("experiments") or [])}
        assert {"width-2", "width-3"} <= names
        c.run("lipdd", "report", "--params", "params.yaml")
        with open(c.path / "results/report/by_width.csv") as f:
            assert sorted(int(float(row["width"])) for row in csv.DictReader(f)) == [2, 3]
