"""End to end: the real `dvc repro` / `dvc exp run` pipeline and a real MLflow store.

Each module run builds one temporary git + DVC repository from the project's own dvc.yaml
and params.yaml (params patched to a tiny, fast training), runs the pipeline once and shares
that run between the checks. Commands run as a user runs them: the venv's `dvc` and `lipdd`
in a subprocess with the repository as working directory and no MLFLOW_TRACKING_URI, so the
store is the default `sqlite:///<repo>/mlflow.db`.

The tests of this module build on each other in file order (one `dvc repro`, then one
`dvc exp run`, then `lipdd stats` by hand, which logs to the first run again, and last a
queued sweep from the experiment's workspace and its report).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from dvc_repo import PATCH, ROOT, STATS_PATCH, Repo, clean_env, make_repo
from lipdd import config as configlib
from lipdd import names, upstream
from lipdd.data import load_prepared
from lipdd.measures import MEASURES

CHECKPOINT_EPOCHS = [0, 2, 4]
EVAL_METRICS = ("train_loss", "test_accuracy", "train_corrupted_accuracy")
SAMPLE_FIELDS = {"stats", "sample_ids", "targets", "ground_truths", "metadata"}


def snapshot(*dirs: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `dirs`: (mtime_ns, content)."""
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file():
                out[str(p)] = (p.stat().st_mtime_ns, p.read_bytes())
    return out


def statistics(stats: dict) -> list[tuple[str, str | None]]:
    """(measure, normalization) of every statistic of the per-sample measures params.yaml asks
    for."""
    return [
        (m, n)
        for m in stats["metric"]
        if MEASURES[m].kind == "sample"
        for n in (stats["normalization"] if "normalization" in MEASURES[m].options else [None])
    ]


def expected_sample_files(stats: dict) -> set[str]:
    """The result files of every checkpoint (by ordinal): per statistic of the per-sample measures,
    on
    the split and on each probe set; per network measure."""
    per_network = [m for m in stats["metric"] if MEASURES[m].kind == "network"]
    ordinals = range(len(CHECKPOINT_EPOCHS))
    return {
        upstream.result_file(m, n, False, stats["dataset_split"], c, probe=p)
        for m, n in statistics(stats)
        for c in ordinals
        for p in (None, *stats["probes"])
    } | {upstream.result_file(m, None, False, None, c) for m in per_network for c in ordinals}


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repo:
    tmp = tmp_path_factory.mktemp("pipeline").resolve()
    return make_repo(tmp / "project", clean_env(tmp))


@pytest.fixture(scope="module")
def first_run(repo) -> str:
    """`dvc repro` once; the id of the training run it made."""
    repo.run("dvc", "repro")
    runs = repo.training_runs()
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0].info.run_id


@pytest.fixture(scope="module")
def experiment(repo, first_run) -> str:
    """`dvc exp run -S label_noise=0.4` after the repro; the id of the second training run."""
    repo.run("dvc", "exp", "run", "-S", "label_noise=0.4")
    new = [r for r in repo.training_runs() if r.info.run_id != first_run]
    assert len(new) == 1, [r.info.run_id for r in new]
    return new[0].info.run_id


# --------------------------------------------------------------------------- 1. dvc repro


def test_repro_logs_one_complete_run(repo, first_run):
    client = repo.client()
    runs = repo.training_runs()
    assert [(r.info.run_id, r.info.status) for r in runs] == [(first_run, "FINISHED")]
    run = runs[0]
    # Besides it, at most the report stage's own run, finished too.
    others = [r for r in repo.runs() if r.info.run_id != first_run]
    assert len(others) <= 1 and all(r.info.status == "FINISHED" for r in others), others
    params = repo.params()

    # Every resolved parameter, under the keys of Config.flat(), as strings.
    expected = configlib.build(params_file=str(repo.path / "params.yaml"), environ={}).flat()
    assert set(configlib.Config().flat()) <= set(run.data.params)
    assert {k: run.data.params[k] for k in expected} == {k: str(v) for k, v in expected.items()}
    assert run.data.params["label_noise"] == "0.2"
    assert run.data.params["epochs"] == "4"
    assert run.data.params["eval_every"] == "2"
    assert run.data.params["width"] == "2"
    assert run.data.params["batch_size"] == "128"

    # Per-batch loss: one value per optimisation step, steps 1..N.
    meta = repo.meta()
    n_train = meta["splits"]["train"]
    n_steps = PATCH["epochs"] * math.ceil(n_train / PATCH["batch_size"])
    history = client.get_metric_history(first_run, "batch_loss")
    assert len(history) == n_steps
    assert sorted(m.step for m in history) == list(range(1, n_steps + 1))
    assert all(math.isfinite(m.value) for m in history)

    # The epoch's mean loss, on the evaluations' x-axis (step = epoch).
    per_epoch = client.get_metric_history(first_run, "epoch_loss")
    assert sorted(m.step for m in per_epoch) == list(range(1, PATCH["epochs"] + 1))
    losses, per = {m.step: m.value for m in history}, n_steps // PATCH["epochs"]
    for m in per_epoch:
        assert m.value == pytest.approx(
            sum(losses[s] for s in range((m.step - 1) * per + 1, m.step * per + 1)) / per
        )

    # Where it comes from: MLflow's own source tags, the DVC experiment and its commit, the dataset.
    head, tags = repo.run("git", "rev-parse", "HEAD").stdout.strip(), run.data.tags
    assert tags["mlflow.source.git.commit"] == tags["dvc_exp_baseline_rev"] == head
    assert (
        tags["mlflow.source.name"],
        tags["dvc_exp_name"],
        tags["params_differ_from_commit"],
    ) == ("lipdd train", "workspace", "false")
    assert tags["test_size"] == str(repo.meta()["splits"]["test"])  # the report's Hoeffding n
    (dataset,) = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == (
        "digits-noise0.2",
        tags["dataset_hash"][:12],
    )
    assert (
        client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"]
        == "custom_model_development"
    )

    # Evaluations at epoch 0 (initial network) and every eval_every epochs.
    for key in EVAL_METRICS:
        assert steps(client, first_run, key) == CHECKPOINT_EPOCHS, key

    # Checkpoints as artifacts, loadable without unpickling arbitrary objects.
    listed = sorted(a.path for a in client.list_artifacts(first_run, "checkpoints"))
    assert listed == [f"checkpoints/epoch_{e:04d}.pt" for e in CHECKPOINT_EPOCHS]
    download = repo.path.parent / "downloaded"
    for epoch, artifact in zip(CHECKPOINT_EPOCHS, listed):
        local = client.download_artifacts(first_run, artifact, str(download))
        state = torch.load(local, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "epoch", "global_step"} <= set(state), artifact
        assert state["epoch"] == epoch
        assert state["global_step"] == epoch * n_steps // PATCH["epochs"]

    # The stats stage logged its per-checkpoint summaries back to the training run.
    for key in (
        "train_jacobian_operator_norm_none_mean",
        "train_jacobian_operator_norm_softmax_mean",
    ):
        history = client.get_metric_history(first_run, key)
        assert sorted(m.step for m in history) == CHECKPOINT_EPOCHS, key
        assert all(m.value > 0 for m in history), key

    # results/train/run.json points at the run.
    run_json = json.loads((repo.path / "results/train/run.json").read_text())
    assert run_json["run_id"] == first_run
    assert run_json["tracking_uri"] == repo.uri
    assert run_json["experiment_name"] == params["name"]
    assert client.get_experiment_by_name(params["name"]).experiment_id == run.info.experiment_id

    # Stats outputs: the summary and one per-sample file per (statistic, checkpoint).
    stats_metrics = json.loads((repo.path / "results/stats/metrics.json").read_text())
    assert stats_metrics["run_id"] == first_run
    samples = repo.path / params["stats"]["output_dir"]
    assert {p.name for p in samples.glob("*.json")} == expected_sample_files(params["stats"])
    for path in samples.glob(f"*-{params['stats']['dataset_split']}-checkpoint-*.json"):
        result = json.loads(path.read_text())
        assert SAMPLE_FIELDS <= set(result), path.name
        n = STATS_PATCH["num_samples"]
        assert len(result["stats"]) == len(result["sample_ids"]) == len(result["targets"]) == n, (
            path.name
        )
        assert len(result["ground_truths"]) == n, path.name
        assert result["metadata"]["run_id"] == first_run

    assert run.data.tags["dataset_hash"] == meta["content_hash"]


def test_the_run_holds_what_people_chart_and_the_plots_read_what_was_written(repo, first_run):
    """At most 120 metric keys (per-checkpoint summaries, not one key per batch statistic: 49 on
    the training points and per network, 24 of the baselines, 9 per probe set, 6 overview curves),
    among them every summary the report draws; every column dvc.yaml's plots name is in its
    file."""
    metrics = repo.client().get_run(first_run).data.metrics
    metrics = {
        k: v for k, v in metrics.items() if not k.startswith("system/")
    }  # MLflow's own, in a tab of their own
    assert len(metrics) <= 120, sorted(metrics)
    # The curves compared first, again under the prefix MLflow shows as a section before the rest.
    client = repo.client()
    for key in names.OVERVIEW:
        history = [(m.step, m.value) for m in client.get_metric_history(first_run, key)]
        overview = client.get_metric_history(first_run, names.OVERVIEW_PREFIX + key)
        assert history and sorted((m.step, m.value) for m in overview) == sorted(history), key
    stats = repo.params()["stats"]
    for measure, normalization in statistics(stats):
        for summary in MEASURES[measure].logged:
            assert (
                names.summary_key(
                    stats["dataset_split"], names.stat(measure, normalization), summary
                )
                in metrics
            )
    by_width = (repo.path / "results/report/by_width.csv").read_text().splitlines()[0].split(",")
    drawn = [c for c in by_width if c.startswith("opnorm_") and not c.endswith(("_low", "_high"))]
    assert drawn and all(
        c.replace("opnorm_", "train_jacobian_operator_norm_") in metrics for c in drawn
    )

    dvc_yaml = yaml.safe_load((repo.path / "dvc.yaml").read_text())
    results_dir = repo.params()["results_dir"]
    for plot in dvc_yaml["plots"]:
        if isinstance(plot, str):  # an image: one of the report's figures
            assert (
                repo.path / plot.replace("${results_dir}", results_dir)
            ).stat().st_size > 10_000, plot
            continue
        (spec,) = plot.values()
        assert {"title", "x_label", "y_label"} <= set(spec), plot
        for path, columns in spec["y"].items():
            header = (
                (repo.path / path.replace("${results_dir}", results_dir))
                .read_text()
                .splitlines()[0]
                .split(",")
            )
            assert {spec["x"], *columns} <= set(header), (path, header)
    # No stage output is drawn column by column: every plot is one of those above.
    assert not any("plots" in stage for stage in dvc_yaml["stages"].values())


# --------------------------------------------------------------------------- 2. dvc exp run


def test_exp_run_label_noise_makes_a_second_run(repo, first_run, experiment):
    client = repo.client()
    run = client.get_run(experiment)
    assert run.info.status == "FINISHED"
    assert run.data.params["label_noise"] == "0.4"
    assert client.get_run(first_run).data.params["label_noise"] == "0.2"
    assert json.loads((repo.path / "results/train/run.json").read_text())["run_id"] == experiment

    # The experiment's prepared data, applied to the workspace, has the new noise exactly.
    meta = repo.meta()
    n_train = meta["splits"]["train"]
    params = repo.params()
    prepared = load_prepared(repo.path / params["prepared_dir"] / params["data"])
    train = prepared.splits["train"]
    assert len(train.labels) == n_train
    assert int((train.labels != train.clean_labels).sum()) == round(0.4 * n_train)
    assert run.data.tags["dataset_hash"] == meta["content_hash"]

    # `dvc exp show` lists the experiment (named in the run's tag) and the workspace, with
    # test_error.
    name = run.data.tags.get("dvc_exp_name")
    assert name, run.data.tags
    rows = list(csv.DictReader(io.StringIO(repo.run("dvc", "exp", "show", "--csv").stdout)))
    header = rows[0].keys() if rows else []
    column = [c for c in header if c == "test_error" or c.endswith(":test_error")]
    assert len(column) == 1, list(header)
    by_rev = {r["rev"]: r for r in rows}
    by_name = {r["Experiment"]: r for r in rows if r["Experiment"]}
    assert "workspace" in by_rev and name in by_name, rows
    for row in (by_rev["workspace"], by_name[name]):
        assert row["label_noise"] == "0.4"
        assert 0.0 <= float(row[column[0]]) <= 1.0


# --------------------------------------------------------------------------- 3. stats by hand


def test_stats_cli_on_first_run(repo, first_run, experiment):
    out = repo.path.parent / "by-hand"
    proc = repo.run(
        "lipdd", "stats", "--run-id", first_run, "--params", "params.yaml", "--output-dir", str(out)
    )
    params = repo.params()
    written = {p.name for p in out.glob("*.json")} - {
        "metrics.json"
    }  # the summary sits beside them
    assert written == expected_sample_files(params["stats"])
    for name in written:
        assert str(out / name) in proc.stdout
        result = json.loads((out / name).read_text())
        assert result["metadata"]["run_id"] == first_run
        if "summary" in result:  # a network measure
            continue
        assert SAMPLE_FIELDS <= set(result)
        assert result["metadata"]["label-noise"] == 0.2  # the run's data, not the workspace's 0.4
        assert len(result["stats"]) == STATS_PATCH["num_samples"]


def test_stats_by_hand_leaves_the_pipeline_and_the_run_alone(repo, first_run, experiment):
    """An analysis of an older run writes its summary beside its results, prepares that run's
    data in a folder of its own, and logs nothing the run already holds."""
    key = "train_jacobian_operator_norm_none_mean"
    before = steps(repo.client(), first_run, key)
    tracked = snapshot(repo.path / "results", repo.path / "data" / "prepared" / "digits")
    out = repo.path.parent / "by-hand-again"
    repo.run(
        "lipdd", "stats", "--run-id", first_run, "--params", "params.yaml", "--output-dir", str(out)
    )
    assert (out / "metrics.json").exists()
    assert snapshot(repo.path / "results", repo.path / "data" / "prepared" / "digits") == tracked
    assert "modified" not in repo.run("dvc", "status").stdout
    assert steps(repo.client(), first_run, key) == before == CHECKPOINT_EPOCHS


# --------------------------------------------------------------------------- 4. bad input


def test_invalid_label_noise_is_refused_before_any_work(repo, first_run):
    before_runs = {r.info.run_id for r in repo.runs()}
    params = repo.params()
    watched = [repo.path / params["results_dir"], repo.path / params["prepared_dir"]]
    before_files = snapshot(*watched)

    proc = repo.run(
        "lipdd", "train", "--params", "params.yaml", "--label-noise", "1.5", check=False
    )

    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "label_noise" in lines[0], proc.stderr
    assert "1.5" in lines[0]
    assert {r.info.run_id for r in repo.runs()} == before_runs
    assert snapshot(*watched) == before_files


# --------------------------------------------------------------------------- 5. code dependencies


def test_an_edit_to_any_module_changes_every_stage(repo, first_run):
    """Every stage depends on the whole package, so an edit to a module none of them names
    (files.py: atomic writes) still reruns them."""
    module = repo.path / "src/lipdd/files.py"
    text = module.read_text()
    assert "modified" not in repo.run("dvc", "status").stdout
    try:
        module.write_text(text + "\n# an edit\n")
        changed = json.loads(repo.run("dvc", "status", "--json").stdout)
        assert {"prepare", "train", "stats", "report"} <= set(changed), changed
    finally:
        module.write_text(text)


# --------------------------------------------------------------------------- 6. a queued sweep


def test_queued_width_sweep_lands_in_the_workspace_store(repo, first_run, experiment):
    """Queued experiments run in temporary copies under .dvc/tmp/exps; their runs must still
    land in the workspace's store, tagged with their DVC experiment names. Queued from the
    workspace the experiment left at label noise 0.4, they make widths 1, 2 and 3 at that noise
    with the experiment's run."""
    repo.sweep("width=1,3")

    runs = [r for r in repo.training_runs() if r.info.run_id not in (first_run, experiment)]
    assert sorted((r.data.params["width"], r.data.params["label_noise"]) for r in runs) == [
        ("1", "0.4"),
        ("3", "0.4"),
    ]
    assert all(r.info.status == "FINISHED" for r in runs)
    names = {r.data.tags["dvc_exp_name"] for r in runs}
    assert len(names) == 2 and "workspace" not in names
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

    # The report of the sweep (params.yaml's noise, 0.4): every measure against width, and its
    # correlation with test error.
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
