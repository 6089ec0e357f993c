"""Sweeps as DVC experiments, and runs that land where they can be compared."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import time
import urllib.request

import pytest

from dvc_repo import ROOT, clean_env, make_repo


@pytest.fixture
def repo(tmp_path):
    return make_repo(tmp_path / "project", clean_env(tmp_path))


def test_queued_width_sweep_lands_in_the_workspace_store(repo):
    """Queued experiments run in temporary copies under .dvc/tmp/exps; their runs must still
    land in the workspace's store, tagged with their DVC experiment names."""
    repo.run("dvc", "exp", "run", "--queue", "-S", "width=1,2,3")
    repo.run("dvc", "queue", "start", "-j", "2")
    deadline = time.time() + 240
    while time.time() < deadline:
        status = repo.run("dvc", "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    assert "Failed" not in status, repo.run("dvc", "queue", "logs", status.split()[0], check=False).stdout

    runs = repo.training_runs()
    assert sorted(r.data.params["width"] for r in runs) == ["1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in runs)
    names = {r.data.tags["dvc_exp_name"] for r in runs}
    assert len(names) == 3 and "workspace" not in names
    head = repo.run("git", "rev-parse", "HEAD").stdout.strip()
    for r in runs:  # each experiment's own change of width: its params differ from the commit it is based on
        assert (r.data.tags["dvc_exp_baseline_rev"], r.data.tags["params_differ_from_commit"]) == (head, "true")
    assert not list((repo.path / ".dvc" / "tmp" / "exps").glob("**/mlflow.db"))
    assert not list((repo.path / ".dvc" / "tmp" / "exps").glob("**/mlruns"))
    for r in runs:  # artifacts under the workspace, not a deleted temporary copy
        assert r.info.artifact_uri.startswith((repo.path / "mlartifacts").as_uri())

    shown = json.loads(repo.run("dvc", "exp", "show", "--json").stdout)
    experiments = {e["name"]: e for commit in shown for e in (commit.get("experiments") or [])}
    for r in runs:
        exp = experiments[r.data.tags["dvc_exp_name"]]
        data = exp["revs"][0]["data"]
        assert data["params"]["params.yaml"]["data"]["width"] == int(r.data.params["width"])
        metrics = data["metrics"]["results/train/run.json"]["data"]
        assert metrics["run_id"] == r.info.run_id
        test_error = data["metrics"]["results/train/metrics.json"]["data"]["test_error"]
        assert test_error == repo.client().get_run(r.info.run_id).data.metrics["test_error"]

    # The README's `dvc exp show` fits 120 columns and shows each experiment's run id and test error.
    command = next(line.split("#")[0].split() for line in (ROOT / "README.md").read_text().splitlines()
                   if line.startswith("dvc exp show --drop"))
    table = repo.run(*(arg.strip("'") for arg in command), env={**repo.env, "COLUMNS": "120"}).stdout.splitlines()
    assert table and max(map(len, table)) <= 120, table
    for r in runs:
        (line,) = [row for row in table if r.info.run_id in row]
        assert f"{r.data.metrics['test_error']:.5g}" in line.split(), (line, r.data.metrics["test_error"])

    # The report of the sweep: every measure against width, and its correlation with test error.
    repo.run("lipdd", "report", "--params", "params.yaml")
    with open(repo.path / "results/report/correlation.csv") as f:
        correlation = {row["measure"]: row for row in csv.DictReader(f)}
    for measure in ("train_jacobian_operator_norm_none_mean", "train_jacobian_operator_norm_none_max",
                    "distance_from_init", "lipschitz_upper_bound", "lipschitz_upper_bound_over_max",
                    "hessian_top_eigenvalue", "hessian_trace", "gradient_norm",
                    "probe_between_jacobian_operator_norm_none_mean", "probe_worst_jacobian_operator_norm_none_max"):
        assert correlation[measure]["n_widths"] == "3", measure
        assert correlation[measure]["spearman_rho"] != "", measure
    for figure in ("measures_vs_width.png", "smoothness_vs_width.png"):
        assert (repo.path / "results/report" / figure).stat().st_size > 10_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pipeline_against_an_mlflow_server(repo, tmp_path):
    port = free_port()
    server = subprocess.Popen(
        ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        # Without its GenAI job runners: a dozen worker processes lipdd never uses.
        env={**repo.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        repo.env["MLFLOW_TRACKING_URI"] = base
        repo.run("dvc", "repro")
        assert not (repo.path / "mlflow.db").exists()

        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=lipdd")
        experiment = json.load(urllib.request.urlopen(request))["experiment"]
        body = json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode()
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body,
                                         headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(request))["runs"]
        training = [r for r in runs if r["data"]["tags"] and
                    not any(t["key"] == "lipdd.kind" for t in r["data"]["tags"])]
        assert len(training) == 1 and training[0]["info"]["status"] == "FINISHED"
        metrics = {m["key"] for m in training[0]["data"]["metrics"]}
        assert {"test_error", "batch_loss", "train_jacobian_operator_norm_none_mean"} <= metrics
        run_json = json.loads((repo.path / "results/train/run.json").read_text())
        assert run_json["run_id"] == training[0]["info"]["run_id"] and run_json["tracking_uri"] == base
        listing = urllib.request.urlopen(
            f"{base}/api/2.0/mlflow/artifacts/list?run_id={run_json['run_id']}&path=checkpoints")
        assert len(json.load(listing)["files"]) == 3
    finally:
        server.terminate()
        server.wait(timeout=30)
