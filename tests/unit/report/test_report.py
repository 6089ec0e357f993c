"""lipdd report against a real SQLite MLflow store holding small, hand-made training runs."""

import csv
import random
import re
import shutil
import time

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from scipy.stats import spearmanr

from lipdd import config, tracking
from lipdd.errors import ConfigError
from lipdd.report import report
from lipdd.report.scores import SCORES
from lipdd.report.tables import interpolation_threshold

EPOCHS = 4
CHECKPOINTS = (0, 2, 4)
OPNORM = [
    f"train_jacobian_operator_norm_{n}_{s}"
    for n in ("none", "softmax")
    for s in ("mean", "median", "std", "clean_mean", "corrupted_mean")
]
# Logged by stats too, but not what the report reads: per-batch means and another split.
IGNORED = [
    "train_jacobian_operator_norm_none_batch_mean_epoch0004",
    "test_jacobian_operator_norm_none_mean",
]
FILES = {
    "by_width.csv",
    "by_epoch.csv",
    "error_vs_width.png",
    "lipschitz_vs_width.png",
    "lipschitz_vs_epoch.png",
    "measures_by_width.csv",
    "measures_by_epoch.csv",
    "correlation.csv",
    "sample_measures_vs_width.png",
    "sample_measures_vs_epoch.png",
    "network_measures_vs_width.png",
    "network_measures_vs_epoch.png",
    "baseline_measures_vs_width.png",
    "baseline_measures_vs_epoch.png",
    "correlation.png",
    "double_descent.png",
    "index.html",
}
NETWORK = ["hessian_top_eigenvalue", "lipschitz_upper_bound", "path_norm"]  # the last a baseline


@pytest.fixture
def store(empty_store, tmp_path):
    """A real SQLite store of this test's own, from conftest's migrated empty one."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    # Explicit artifact location: otherwise artifacts would land under the working directory.
    exp_id = client.create_experiment("lipdd", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, exp_id


def make_run(client, exp_id, status="FINISHED", stats=True, **overrides):
    """A training run as train + stats log it; returns its id and {metric: {epoch: value}}."""
    cfg = config.build(overrides, environ={})
    run_id = client.create_run(exp_id, run_name=cfg.run_name()).info.run_id
    tracking.log_params(client, run_id, cfg.flat())
    rng, now, logged = random.Random(run_id), int(time.time() * 1000), {}
    for epoch in range(EPOCHS + 1):
        keys = ["train_error", "test_error", "train_loss", "lr"]
        if stats and epoch in CHECKPOINTS:
            keys += OPNORM + IGNORED + NETWORK
        for key in keys:
            logged.setdefault(key, {})[epoch] = rng.random()
    metrics = [
        Metric(k, v, now, step) for k, series in logged.items() for step, v in series.items()
    ]
    client.log_batch(
        run_id, metrics=metrics[::-1]
    )  # highest step first: "final" is not "last logged"
    client.set_tag(run_id, "test_size", "100")
    client.set_terminated(run_id, status)
    return run_id, logged


def report_config(uri, tmp_path, **overrides):
    return config.build(
        {
            "tracking_uri": uri,
            "results_dir": str(tmp_path / "results"),
            "label_noise": 0.2,
            **overrides,
        },
        environ={},
    )


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report(store, tmp_path, capsys):
    uri, client, exp_id = store
    runs = {  # a sweep of 3 widths x 2 seeds, one seed at width 1
        1: [make_run(client, exp_id, width=1, label_noise=0.2)],
        **{
            w: [make_run(client, exp_id, width=w, seed=s, label_noise=0.2) for s in (1, 2)]
            for w in (2, 4)
        },
    }
    make_run(client, exp_id, width=8, label_noise=0.4)  # other noise level
    make_run(client, exp_id, width=8, label_noise=0.2, status="RUNNING")  # unfinished
    make_run(client, exp_id, width=8, label_noise=0.2, model="resnet18")  # other family
    empty = client.create_run(exp_id).info.run_id  # finished, but neither errors nor stats
    tracking.log_params(
        client, empty, config.build({"width": 8, "label_noise": 0.2}, environ={}).flat()
    )
    client.set_terminated(empty, "FINISHED")

    # `lipdd stats` rerun on the width-4 run: at each step the newer (here smaller) value wins, as
    # in MLflow.
    run_id, logged = runs[4][0]
    later = int(time.time() * 1000) + 1000
    for key in OPNORM:
        for epoch in CHECKPOINTS:
            logged[key][epoch] -= 1
    client.log_batch(
        run_id, metrics=[Metric(k, logged[k][e], later, e) for k in OPNORM for e in CHECKPOINTS]
    )

    cfg = report_config(uri, tmp_path)
    written = report(cfg)
    out = tmp_path / "results" / "report"
    assert {p.name for p in written} == FILES and all(p.parent == out for p in written)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # no temp files left behind
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000

    def expected(group, key, epoch=EPOCHS):
        values = [logged[key][epoch] for _, logged in group]
        return sum(values) / len(values)

    def assert_interval(row, group, column, key, epoch=EPOCHS):
        """Two seeds' bootstrap interval of the mean is their min and max; one has none."""
        values = [logged[key][epoch] for _, logged in group]
        bounds = (row[f"{column}_low"], row[f"{column}_high"])
        if len(values) == 1:
            assert bounds == ("", "")
        else:
            assert tuple(map(float, bounds)) == (min(values), max(values))

    def bounded(columns):
        return [c for column in columns for c in (column, f"{column}_low", f"{column}_high")]

    rows = read_csv(out / "by_width.csv")
    assert [int(r["width"]) for r in rows] == [1, 2, 4]
    norm_columns = [
        f"opnorm_{n}_{s}"
        for n in ("none", "softmax")
        for s in ("mean", "clean_mean", "corrupted_mean")
    ]
    assert list(rows[0]) == [
        "width",
        "n_runs",
        *bounded(["train_error", "test_error", *norm_columns]),
        "run_ids",
    ]
    for row in rows:
        group = runs[int(row["width"])]
        assert int(row["n_runs"]) == len(group)
        assert set(row["run_ids"].split(";")) == {run_id for run_id, _ in group}
        for key in ("train_error", "test_error"):
            assert float(row[key]) == expected(group, key)
            assert_interval(row, group, key, key)
        for column in norm_columns:
            key = column.replace("opnorm", "train_jacobian_operator_norm")
            assert float(row[column]) == expected(group, key)
            assert_interval(row, group, column, key)

    rows = read_csv(out / "by_epoch.csv")
    assert [(int(r["width"]), int(r["epoch"])) for r in rows] == [
        (w, e) for w in (1, 2, 4) for e in CHECKPOINTS
    ]
    assert list(rows[0]) == ["width", "epoch", *bounded(norm_columns)]
    for row in rows:
        group, epoch = runs[int(row["width"])], int(row["epoch"])
        for column in norm_columns:
            key = column.replace("opnorm", "train_jacobian_operator_norm")
            assert float(row[column]) == expected(group, key, epoch)
            assert_interval(row, group, column, key, epoch)

    # Every measure, and how it tracks test error across widths.
    measures = sorted(k for k in OPNORM + NETWORK if not k.endswith(("_median", "_std")))
    rows = read_csv(out / "measures_by_width.csv")
    assert list(rows[0]) == [
        "width", "n_runs", *bounded(["train_error", "test_error", *measures]), "run_ids"
    ]  # fmt: skip
    for row in rows:
        for key in measures:
            assert float(row[key]) == pytest.approx(expected(runs[int(row["width"])], key))
            assert_interval(row, runs[int(row["width"])], key, key)
    # Every score of every measure, each with its interval (lipdd.report.scores, test_scores.py).
    correlation = {r["measure"]: r for r in read_csv(out / "correlation.csv")}
    assert sorted(correlation) == measures
    for key in measures:
        row = correlation[key]
        means = [(expected(runs[w], key), expected(runs[w], "test_error")) for w in (1, 2, 4)]
        assert float(row["spearman_rho"]) == pytest.approx(spearmanr(*zip(*means)).statistic)
        for score in SCORES:
            assert float(row[f"{score}_low"]) <= float(row[f"{score}_high"]), (key, score)
        assert {"psi_width", "psi_seed", "psi_epoch"} <= set(row) and row["psi_epoch"] != ""
        assert (row["n_widths"], row["n_runs"]) == ("3", "5")
    captured = capsys.readouterr()
    table = captured.out.splitlines()  # the ranking, printed
    assert table[0].split()[:4] == ["measure", "Spearman", "rho", "Kendall"]
    assert sorted(line.split()[0] for line in table[1:]) == measures

    # The page: every figure once, the paper's first, the ranking table, every table linked.
    page = (out / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(images) == sorted(f for f in FILES if f.endswith(".png"))
    assert images[0] == "double_descent.png"
    assert images.index("baseline_measures_vs_width.png") > images.index("correlation.png")
    assert sorted(re.findall(r'<a href="([^"]+)"', page)) == sorted(
        f for f in FILES if f.endswith(".csv")
    )
    ranked = re.findall(r"<tr><td>([^<]+)</td>", page)
    assert ranked == [line.split()[0] for line in table[1:]]  # as printed, best first

    # The report run: in an experiment of its own, named apart from the next one.
    reports = client.get_experiment_by_name("lipdd-reports")
    assert reports.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([reports.experiment_id], "tags.`lipdd.kind` = 'report'")
    assert run.info.status == "FINISHED" and re.fullmatch(
        r"report-cnn5-digits-noise0.2-\d{8}-\d{6}", run.info.run_name
    )
    assert run.data.params["n_runs"] == "5" and run.data.params["label_noise"] == "0.2"
    assert run.data.tags["lipdd.training_experiment"] == "lipdd"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == FILES
    assert not client.search_runs([exp_id], "tags.`lipdd.kind` = 'report'")
    err = captured.err
    drawn = [run_id for group in runs.values() for run_id, _ in group]
    assert "report: drawing 5 runs of experiment 'lipdd': width 1: " in err and all(
        r in err for r in drawn
    )
    assert (
        f"report: leaving out run {empty} " in err
        and "it has neither test_error nor Jacobian stats" in err
    )
    assert "it is RUNNING" in err

    # A second report is a second run.
    time.sleep(1)
    before = (out / "by_width.csv").read_text()
    report(cfg)
    assert (out / "by_width.csv").read_text() == before
    assert len({r.info.run_name for r in client.search_runs([reports.experiment_id])}) == 2


def test_report_without_stats(store, tmp_path):
    """Errors only, one width: the figures still come out, with no operator-norm columns."""
    uri, client, exp_id = store
    run_id, logged = make_run(client, exp_id, stats=False, width=3, label_noise=0.2)
    report(report_config(uri, tmp_path))
    (row,) = read_csv(tmp_path / "results" / "report" / "by_width.csv")
    assert row == {
        "width": "3",
        "n_runs": "1",
        "train_error": str(logged["train_error"][EPOCHS]),
        "train_error_low": "",  # one run: no interval
        "train_error_high": "",
        "test_error": str(logged["test_error"][EPOCHS]),
        "test_error_low": "",
        "test_error_high": "",
        "run_ids": run_id,
    }
    assert (tmp_path / "results" / "report" / "lipschitz_vs_epoch.png").stat().st_size > 0


def test_no_matching_run(store, tmp_path):
    uri, client, exp_id = store
    make_run(client, exp_id, width=1, label_noise=0.2)
    report(report_config(uri, tmp_path))  # a report run carries the same params: it must not count
    out = tmp_path / "results" / "report"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    training = r"it has 1 training runs \(data/model/label_noise: 1 x digits/cnn5/0.2\)"
    with pytest.raises(ConfigError, match=rf"label_noise=0.3; {training}"):
        report(report_config(uri, tmp_path, label_noise=0.3))
    with pytest.raises(ConfigError, match="experiment 'no-such' does not exist"):
        report(report_config(uri, tmp_path, name="no-such"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    reports = client.get_experiment_by_name("lipdd-reports")
    assert len(client.search_runs([reports.experiment_id], "tags.`lipdd.kind` = 'report'")) == 1


def test_another_sweep_at_the_same_noise_is_left_out(store, tmp_path, capsys):
    """Adam and SGD sweeps at one noise level: the report draws the one its parameters name;
    a parameter every run shares (epochs=7 here, against the default 100) need not be given."""
    uri, client, exp_id = store
    adam = {
        w: make_run(client, exp_id, width=w, label_noise=0.2, optimizer="adam", epochs=7)
        for w in (1, 2)
    }
    for w in (1, 2, 4):
        make_run(client, exp_id, width=w, label_noise=0.2, optimizer="sgd", epochs=7)
    report(report_config(uri, tmp_path, optimizer="adam"))
    rows = read_csv(tmp_path / "results" / "report" / "by_width.csv")
    assert [(int(r["width"]), r["run_ids"]) for r in rows] == [(w, adam[w][0]) for w in (1, 2)]
    err = capsys.readouterr().err
    assert (
        "the runs differ in optimizer (adam: 2 runs, sgd: 3 runs); keeping the 2 with "
        "optimizer=adam" in err
    )

    for lr in (0.01, 0.001):
        make_run(client, exp_id, width=8, label_noise=0.4, learning_rate=lr)
    out = tmp_path / "results" / "report"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(
        ConfigError,
        match=r"^report: the runs of cnn5 on digits at label noise 0.4 differ in "
        r"learning_rate \(0.001: 1 runs, 0.01: 1 runs\) and none has learning_rate=0.1; pass "
        r"--learning-rate with one of those values$",
    ):
        report(report_config(uri, tmp_path, label_noise=0.4, learning_rate=0.1))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    reports = client.get_experiment_by_name("lipdd-reports")
    assert len(client.search_runs([reports.experiment_id], "tags.`lipdd.kind` = 'report'")) == 1


def test_interpolation_threshold():
    rows = [{"width": w, "train_error": e} for w, e in ((1, 0.3), (2, 0.1), (4, 0.0), (8, 0.0))]
    assert interpolation_threshold(rows) == 4
    assert interpolation_threshold(rows[:2]) is None
