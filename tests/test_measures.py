"""The registry of measures: per-network measures against independent float64 references, and
the path a new measure takes (one function, one entry) through `lipdd stats` to files and MLflow."""

import json

import pytest
import torch

from lipdd import cli, config, train
from lipdd.models import model_for
from lipdd.measures import MEASURES, Measure
from lipdd.tracking import get_client, list_checkpoints, load_checkpoint

STATS = ["--num-samples=100", "--batch-size=50", "--output-dir=out", "--device=cpu"]


@pytest.fixture
def run_id(workdir):
    """A tiny trained network with checkpoints at epochs 0 and 2."""
    return train.train(config.build(dict(width=2, epochs=2, batch_size=256, eval_every=1, save_checkpoint=[0],
                                         device="cpu"), environ={}))


def test_distance_from_init_against_two_downloaded_checkpoints(workdir, run_id):
    assert cli.main(["stats", "--run-id", run_id, "--metric", "distance_from_init", *STATS]) == 0
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    (_, first), (_, last) = list_checkpoints(client, run_id)
    theta0, theta = (load_checkpoint(client, run_id, a)["model"] for a in (first, last))
    params = [name for name, _ in model_for(config.build(dict(width=2), environ={}),
                                                    dict(image_shape=[8, 8, 1], num_classes=10)).named_parameters()]

    def norm(tensors):
        return torch.cat([t.double().flatten() for t in tensors]).norm().item()

    at0 = json.loads((workdir / "out/distance_from_init_epoch0000.json").read_text())
    assert at0["summary"]["distance_from_init"] == 0 and at0["summary"]["distance_from_init_relative"] == 0
    assert at0["summary"]["parameter_norm"] == pytest.approx(norm(theta0[k] for k in params), rel=1e-12)

    at2 = json.loads((workdir / "out/distance_from_init_epoch0002.json").read_text())
    distance, initial = norm(theta[k] - theta0[k] for k in params), norm(theta0[k] for k in params)
    assert distance > 0
    assert at2["summary"]["distance_from_init"] == pytest.approx(distance, rel=1e-12)
    assert at2["summary"]["distance_from_init_relative"] == pytest.approx(distance / initial, rel=1e-12)
    assert at2["summary"]["parameter_norm"] == pytest.approx(norm(theta[k] for k in params), rel=1e-12)
    assert sorted(at2["per_layer"]) == sorted(params)
    for k in params:
        assert at2["per_layer"][k]["distance"] == pytest.approx(norm([theta[k] - theta0[k]]), rel=1e-12)
    assert at2["metadata"]["metric"] == "distance_from_init" and at2["metadata"]["checkpoint_epoch"] == 2

    history = client.get_metric_history(run_id, "distance_from_init")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (2, at2["summary"]["distance_from_init"])]


def test_a_new_measure_is_one_function_and_one_entry(workdir, run_id, monkeypatch):
    monkeypatch.setitem(MEASURES, "logit_norm", Measure("logit_norm", "sample", lambda b: b.logits.norm(dim=1)))
    monkeypatch.setitem(MEASURES, "parameter_count", Measure(
        "parameter_count", "network", lambda n: ({"parameter_count": float(sum(p.numel() for p in n.model.parameters()))},
                                                 {})))
    assert cli.main(["stats", "--run-id", run_id, "--metric", "logit_norm", "parameter_count", "accuracy",
                     *STATS]) == 0
    out = {p.name for p in (workdir / "out").glob("*_epoch*.json")}
    assert out == {f"parameter_count_epoch{e:04d}.json" for e in (0, 2)} | {
        f"{name}_train_epoch{e:04d}-0.json" for name in ("accuracy", "logit_norm") for e in (0, 2)}
    values = json.loads((workdir / "out/logit_norm_train_epoch0002-0.json").read_text())
    assert len(values["stats"]) == 100 and min(values["stats"]) > 0 and len(values["batch_means"]) == 2

    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    metrics = client.get_run(run_id).data.metrics
    assert {"train_logit_norm_mean", "train_logit_norm_clean_mean", "parameter_count"} <= set(metrics)
    assert [m.step for m in client.get_metric_history(run_id, "train_logit_norm_mean")] == [0, 2]
    summary = json.loads((workdir / "results/stats/metrics.json").read_text())  # the pipeline run's
    assert summary["logit_norm"]["mean"] == pytest.approx(sum(values["stats"]) / 100)


def test_unknown_measure_is_refused_before_any_work(workdir, run_id, capsys):
    assert cli.main(["stats", "--run-id", run_id, "--metric", "lipschitz", *STATS]) == 2
    err = capsys.readouterr().err.strip()
    assert "stats.metric: 'lipschitz' is not allowed; expected one of jacobian_operator_norm" in err and "\n" not in err
    assert not (workdir / "out").exists()


def test_network_measure_needs_the_initial_checkpoint(workdir, capsys):
    run_id = train.train(config.build(dict(width=2, epochs=2, batch_size=256, eval_every=1, save_checkpoint=[1, 2],
                                           device="cpu"), environ={}))
    assert cli.main(["stats", "--run-id", run_id, "--metric", "distance_from_init", *STATS]) == 2
    assert "has no checkpoint of epoch 0" in capsys.readouterr().err
    assert not (workdir / "out").exists()
