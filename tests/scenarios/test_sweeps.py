"""Sweeps as DVC experiments, and runs that land where they can be compared."""

from __future__ import annotations

import csv
import json

import pytest

from dvc_repo import ROOT, clean_env, make_repo


@pytest.fixture
def repo(tmp_path):
    return make_repo(tmp_path / "project", clean_env(tmp_path))


def test_queued_width_sweep_lands_in_the_workspace_store(repo):
    """Queued experiments run in temporary copies under .dvc/tmp/exps; their runs must still
    land in the workspace's store, tagged with their DVC experiment names."""
    repo.sweep("width=1,2,3")

    runs = repo.training_runs()
    assert sorted(r.data.params["width"] for r in runs) == ["1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in runs)
    names = {r.data.tags["dvc_exp_name"] for r in runs}
    assert len(names) == 3 and "workspace" not in names
    head = repo.run("git", "rev-parse", "HEAD").stdout.strip()
    for r in (
        runs
    ):  # each experiment's own change of width: its params differ from the commit it is based on
        assert (r.data.tags["dvc_exp_baseline_rev"], r.data.tags["params_differ_from_commit"]) == (
            head,
            "true",
        )
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

    # The README's `dvc exp show` fits 120 columns and shows each experiment's run id and test
    # error.
    command = next(
        line.split("#")[0].split()
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("dvc exp show --drop")
    )
    table = repo.run(
        *(arg.strip("'") for arg in command), env={**repo.env, "COLUMNS": "120"}
    ).stdout.splitlines()
    assert table and max(map(len, table)) <= 120, table
    for r in runs:
        (line,) = [row for row in table if r.info.run_id in row]
        assert f"{r.data.metrics['test_error']:.5g}" in line.split(), (
            line,
            r.data.metrics["test_error"],
        )

    # The report of the sweep: every measure against width, and its correlation with test error.
    repo.run("lipdd", "report", "--params", "params.yaml")
    with open(repo.path / "results/report/correlation.csv") as f:
        correlation = {row["measure"]: row for row in csv.DictReader(f)}
    for measure in (
        "train_jacobian_operator_norm_none_mean",
        "train_jacobian_operator_norm_none_max",
        "distance_from_init",
        "lipschitz_upper_bound",
        "lipschitz_upper_bound_over_max",
        "hessian_top_eigenvalue",
        "hessian_trace",
        "gradient_norm",
        "probe_between_jacobian_operator_norm_none_mean",
        "probe_worst_jacobian_operator_norm_none_max",
    ):
        assert correlation[measure]["n_widths"] == "3", measure
        assert correlation[measure]["spearman_rho"] != "", measure
    for figure in (
        "double_descent.png",
        "baseline_measures_vs_width.png",
        "sample_measures_vs_width.png",
        "network_measures_vs_width.png",
        "probe_measures_vs_width.png",
        "smoothness_vs_width.png",
    ):
        assert (repo.path / "results/report" / figure).stat().st_size > 10_000
