"""The registry of measures: per-network measures against independent float64 references, and
the path a new measure takes (one function, one entry) through `lipdd stats` to files and MLflow."""

import json
import math

import numpy as np
import pytest
import torch

from explicit import explicit_norm, with_running_stats
from lipdd import cli, config, train
from lipdd.measures import MEASURES, Measure, Network, lipschitz
from lipdd.measures.jacobian import input_jacobian
from lipdd.models import build_model, model_for
from lipdd.tracking import get_client, list_checkpoints, load_checkpoint

STATS = ["--num-samples=100", "--batch-size=50", "--output-dir=out", "--device=cpu"]


@pytest.fixture
def run_id(tiny_run):
    return tiny_run


def test_distance_from_init_against_two_downloaded_checkpoints(workdir, run_id):
    assert cli.main(["stats", "--run-id", run_id, "--metric", "distance_from_init", *STATS]) == 0
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    (_, first), (_, last) = list_checkpoints(client, run_id)
    theta0, theta = (load_checkpoint(client, run_id, a)["model"] for a in (first, last))
    params = [
        name
        for name, _ in model_for(
            config.build(dict(width=2), environ={}), dict(image_shape=[8, 8, 1], num_classes=10)
        ).named_parameters()
    ]

    def norm(tensors):
        return torch.cat([t.double().flatten() for t in tensors]).norm().item()

    at0 = json.loads((workdir / "out/distance_from_init-checkpoint-0.json").read_text())
    assert (
        at0["summary"]["distance_from_init"] == 0
        and at0["summary"]["distance_from_init_relative"] == 0
    )
    assert at0["summary"]["parameter_norm"] == pytest.approx(
        norm(theta0[k] for k in params), rel=1e-12
    )

    at2 = json.loads((workdir / "out/distance_from_init-checkpoint-1.json").read_text())
    distance, initial = norm(theta[k] - theta0[k] for k in params), norm(theta0[k] for k in params)
    assert distance > 0
    assert at2["summary"]["distance_from_init"] == pytest.approx(distance, rel=1e-12)
    assert at2["summary"]["distance_from_init_relative"] == pytest.approx(
        distance / initial, rel=1e-12
    )
    assert at2["summary"]["parameter_norm"] == pytest.approx(
        norm(theta[k] for k in params), rel=1e-12
    )
    assert sorted(at2["per_layer"]) == sorted(params)
    for k in params:
        assert at2["per_layer"][k]["distance"] == pytest.approx(
            norm([theta[k] - theta0[k]]), rel=1e-12
        )
    assert (
        at2["metadata"]["metric"] == "distance_from_init"
        and at2["metadata"]["checkpoint_epoch"] == 2
    )
    assert at2["metadata"]["checkpoint"] == 1

    history = client.get_metric_history(run_id, "distance_from_init")
    assert sorted((m.step, m.value) for m in history) == [
        (0, 0.0),
        (2, at2["summary"]["distance_from_init"]),
    ]


def test_a_new_measure_is_one_function_and_one_entry(workdir, run_id, monkeypatch):
    monkeypatch.setitem(
        MEASURES, "logit_norm", Measure("logit_norm", "sample", lambda b: b.logits.norm(dim=1))
    )
    monkeypatch.setitem(
        MEASURES,
        "parameter_count",
        Measure(
            "parameter_count",
            "network",
            lambda n: (
                {"parameter_count": float(sum(p.numel() for p in n.model.parameters()))},
                {},
            ),
        ),
    )
    assert (
        cli.main(
            [
                "stats",
                "--run-id",
                run_id,
                "--metric",
                "logit_norm",
                "parameter_count",
                "accuracy",
                *STATS,
            ]
        )
        == 0
    )
    out = {p.name for p in (workdir / "out").glob("*.json")}
    assert out == {f"parameter_count-checkpoint-{c}.json" for c in (0, 1)} | {
        f"{name}-train-checkpoint-{c}.json" for name in ("accuracy", "logit_norm") for c in (0, 1)
    }
    values = json.loads((workdir / "out/logit_norm-train-checkpoint-1.json").read_text())
    values["stats"] = [v for (v,) in values["stats"]]
    assert (
        len(values["stats"]) == 100 and min(values["stats"]) > 0 and len(values["batch_means"]) == 2
    )

    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    metrics = client.get_run(run_id).data.metrics
    assert {"train_logit_norm_mean", "train_logit_norm_clean_mean", "parameter_count"} <= set(
        metrics
    )
    assert [m.step for m in client.get_metric_history(run_id, "train_logit_norm_mean")] == [0, 2]
    summary = json.loads((workdir / "results/stats/metrics.json").read_text())  # the pipeline run's
    assert summary["logit_norm"]["mean"] == pytest.approx(sum(values["stats"]) / 100)


def test_unknown_measure_is_refused_before_any_work(workdir, run_id, capsys):
    assert cli.main(["stats", "--run-id", run_id, "--metric", "lipschitz", *STATS]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "stats.metric: 'lipschitz' is not allowed; expected one of jacobian_operator_norm" in err
        and "\n" not in err
    )
    assert not (workdir / "out").exists()


def test_network_measure_needs_the_initial_checkpoint(workdir, capsys):
    run_id = train.train(
        config.build(
            dict(
                width=2,
                label_seed=0,
                epochs=2,
                batch_size=256,
                eval_every=1,
                save_checkpoint=[1, 2],
                device="cpu",
            ),
            environ={},
        )
    )
    assert cli.main(["stats", "--run-id", run_id, "--metric", "distance_from_init", *STATS]) == 2
    assert "has no checkpoint of epoch 0" in capsys.readouterr().err
    assert not (workdir / "out").exists()


# --- the Lipschitz upper bound ------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm", [False, True])
def test_cnn5_bound_is_the_product_of_its_maps_exact_norms(batch_norm):
    torch.manual_seed(0)
    model = with_running_stats(build_model("cnn5", 2, 1, 10, batch_norm=batch_norm))
    bound, maps = lipschitz.upper_bound(model, (1, 8, 8))
    net = model.double()
    runs = [
        torch.nn.Sequential(net.layer1.conv, net.layer1.bn),
        torch.nn.Sequential(net.layer2.conv, net.layer2.bn),
        torch.nn.Sequential(net.pool, net.layer3.conv, net.layer3.bn),
        torch.nn.Sequential(net.pool, net.layer4.conv, net.layer4.bn),
        torch.nn.Sequential(net.apool, torch.nn.Flatten(), net.fc),
    ]
    shapes = [
        (1, 8, 8),
        (2, 8, 8),
        (4, 8, 8),
        (8, 4, 4),
        (16, 2, 2),
    ]  # pooling opens the third and fourth
    want = [explicit_norm(run, shape) for run, shape in zip(runs, shapes)]
    assert [m["input_shape"] for m in maps] == [list(s) for s in shapes]
    assert [m["norm"] for m in maps] == pytest.approx(want, rel=1e-8)
    assert bound == pytest.approx(math.prod(want), rel=1e-8)


@pytest.mark.parametrize("weight_init, batch_norm", [("pytorch", True), ("mfixup", False)])
def test_resnet_bound_adds_shortcut_and_branch_per_block(weight_init, batch_norm):
    torch.manual_seed(0)
    model = with_running_stats(
        build_model("resnet18", 2, 3, 10, batch_norm=batch_norm, weight_init=weight_init)
    )
    bound, maps = lipschitz.upper_bound(model, (3, 8, 8))
    net = model.double()
    norms = {m["map"]: m["norm"] for m in maps}
    want, shape = explicit_norm(lambda x: net.bn1(net.conv1(x)), (3, 8, 8)), (2, 8, 8)
    assert norms["stem0"] == pytest.approx(want, rel=1e-8)
    blocks = [
        (f"layer{i}.{j}", block)
        for i in range(1, 5)
        for j, block in enumerate(getattr(net, f"layer{i}"))
    ]
    assert len(blocks) == 8
    for name, block in blocks:
        first = explicit_norm(lambda x: block.bn1(block.conv1(x)), shape)
        out = tuple(block.conv1(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
        second = explicit_norm(lambda x: block.bn2(block.conv2(x)), out)
        shortcut = 1.0 if block.downsample is None else explicit_norm(block.downsample, shape)
        assert norms[f"{name}.branch0"] == pytest.approx(first, rel=1e-8)
        assert norms[f"{name}.branch1"] == pytest.approx(second, rel=1e-8)
        assert norms.get(f"{name}.shortcut", 1.0) == pytest.approx(shortcut, rel=1e-8)
        want *= shortcut + first * second
        shape = out
    want *= explicit_norm(torch.nn.Sequential(net.avgpool, torch.nn.Flatten(), net.fc), shape)
    assert bound == pytest.approx(want, rel=1e-8)
    # No input's Jacobian may exceed it.
    x = torch.randn(64, 3, 8, 8)
    opnorms = torch.linalg.matrix_norm(
        input_jacobian(model.float(), x, torch.zeros(64, dtype=torch.long)), ord=2
    )
    assert 0 < opnorms.max().item() <= bound


def test_upper_bound_holds_at_every_checkpoint(workdir, run_id):
    """The bound is never below the largest per-sample operator norm: a failure is a wrong bound."""
    args = [
        "--metric",
        "jacobian_operator_norm",
        "lipschitz_upper_bound",
        "--normalization",
        "none",
        "softmax",
    ]
    assert cli.main(["stats", "--run-id", run_id, *args, *STATS]) == 0
    for checkpoint in (0, 1):
        bound = json.loads(
            (workdir / f"out/lipschitz_upper_bound-checkpoint-{checkpoint}.json").read_text()
        )["summary"]
        for norm, key in (
            ("", "lipschitz_upper_bound"),
            ("-softmax", "lipschitz_upper_bound_softmax"),
        ):
            result = json.loads(
                (
                    workdir / f"out/jacobian_operator_norm{norm}-train-checkpoint-{checkpoint}.json"
                ).read_text()
            )
            largest = max(v for (v,) in result["stats"])
            assert 0 < largest <= bound[key], (checkpoint, norm)
            assert bound[f"{key}_over_max"] == pytest.approx(bound[key] / largest, rel=1e-12)
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    metrics = client.get_run(run_id).data.metrics
    assert {
        "lipschitz_upper_bound_over_max",
        "lipschitz_upper_bound_softmax_over_max",
        "train_jacobian_operator_norm_none_max",
        "train_jacobian_operator_norm_softmax_p99",
    } <= set(metrics)
    assert metrics["lipschitz_upper_bound_over_max"] >= 1


# --- loss curvature -------------------------------------------------------------------------------


def explicit_loss_hessian(model, x, y):
    """(gradient, Hessian) of the mean cross-entropy w.r.t. the flat parameters, built whole
    (float64)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(theta):
        parts = torch.split(theta, [math.prod(s) for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return torch.func.grad(loss)(flat), torch.func.jacrev(torch.func.jacrev(loss))(flat)


def test_loss_curvature_against_the_explicit_hessian():
    torch.manual_seed(0)
    model = build_model("cnn5", 1, 1, 10).double().eval()
    x, y = torch.randn(100, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (100,))
    options = config.build(
        {
            "stats.curvature_top_k": 3,
            "stats.curvature_tolerance": 1e-8,
            "stats.hutchinson_probes": 50,
        },
        environ={},
    ).stats
    summary, details = MEASURES["loss_curvature"].fn(
        Network(model, None, (1, 8, 8), lambda: (x, y), options)
    )
    grad, hessian = explicit_loss_hessian(model, x, y)
    exact = torch.linalg.eigvalsh(hessian).flip(0)
    assert details["parameters"] == len(grad) == 492 and details["training_points"] == 100
    assert details["eigenvalues"] == pytest.approx(exact[:3].tolist(), rel=1e-5)
    assert summary["hessian_top_eigenvalue"] == details["eigenvalues"][0]
    assert summary["gradient_norm"] == pytest.approx(grad.norm().item(), rel=1e-10)
    trace = torch.trace(hessian).item()
    assert abs(summary["hessian_trace"] - trace) < 3 * summary["hessian_trace_se"]
    assert 0 < summary["hessian_trace_se"] < 0.5 * abs(trace)  # an estimate that says something
    # Each sample is v^T H v for the documented probes: Rademacher vectors drawn on the model's
    # device by a torch generator seeded stats.curvature_seed, one after another.
    generator = torch.Generator().manual_seed(options.curvature_seed)
    probes = [torch.randint(0, 2, (len(grad),), generator=generator) * 2.0 - 1 for _ in range(50)]
    explicit = [(v.double() @ hessian @ v.double()).item() for v in probes]
    assert details["trace_samples"] == pytest.approx(explicit, rel=1e-9, abs=1e-12)
    # Per layer: the diagonal block of each module's parameters, its trace from the same probes.
    sizes = {"layer1.conv": 10, "layer2.conv": 20, "layer3.conv": 76, "layer4.conv": 296, "fc": 90}
    assert {k: v["parameters"] for k, v in details["per_layer"].items()} == sizes
    start = 0
    for layer, size in sizes.items():
        cut, got = slice(start, start + size), details["per_layer"][layer]
        shares = [(v.double()[cut] @ (hessian @ v.double())[cut]).item() for v in probes]
        assert got["trace"] == pytest.approx(sum(shares) / 50, rel=1e-9, abs=1e-12)
        start += size
    total = sum(r["trace"] for r in details["per_layer"].values())
    assert total == pytest.approx(summary["hessian_trace"], rel=1e-9)


def test_hessian_spectrum_moments_against_the_explicit_eigenvalues():
    """Stochastic Lanczos quadrature is exact for polynomials of degree below 2 x steps: each
    moment equals the mean over the same probes of sum_i lambda_i^k (q_i . v)^2 / n, with the
    explicit Hessian's eigenpairs; the first is Hutchinson's trace of those probes over n."""
    torch.manual_seed(0)
    model = build_model("cnn5", 1, 1, 10).double().eval()
    x, y = torch.randn(100, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (100,))
    options = config.build({"stats.spectrum_probes": 3, "stats.spectrum_steps": 20}, environ={})
    summary, details = MEASURES["hessian_spectrum"].fn(
        Network(model, None, (1, 8, 8), lambda: (x, y), options.stats)
    )
    _, hessian = explicit_loss_hessian(model, x, y)
    eigenvalues, vectors = torch.linalg.eigh(hessian)
    generator = torch.Generator().manual_seed(options.stats.curvature_seed)
    probes = [torch.randint(0, 2, (492,), generator=generator) * 2.0 - 1 for _ in range(3)]
    squares = torch.stack([(vectors.T @ v.double()) ** 2 / 492 for v in probes])  # (probes, n)
    want = [(squares * eigenvalues**k).sum(1).mean().item() for k in range(5)]
    assert details["moments"] == pytest.approx(want, rel=1e-6)
    assert want[0] == pytest.approx(1.0, rel=1e-12)
    hutchinson = sum((v.double() @ hessian @ v.double()).item() for v in probes) / 3
    assert summary["hessian_density_mean"] == pytest.approx(hutchinson / 492, rel=1e-9)
    assert summary["hessian_density_second_moment"] == pytest.approx(want[2], rel=1e-6)
    nodes, weights = (np.array(details[k]) for k in ("nodes", "weights"))
    assert nodes.shape == weights.shape == (3, 20)
    assert summary["hessian_negative_mass"] == pytest.approx(weights[nodes < 0].sum() / 3)
    assert 0 < summary["hessian_negative_mass"] < 1  # a random network's Hessian is indefinite
    # The quadrature's nodes are Ritz values: inside the spectrum, the extremes nearly reached.
    assert eigenvalues[0] - 1e-9 <= nodes.min() and nodes.max() <= eigenvalues[-1] + 1e-9
    assert nodes.max() == pytest.approx(eigenvalues[-1].item(), rel=1e-3)
    start = 0
    for layer, got in details["per_layer"].items():
        end = start + got["parameters"]
        top = torch.linalg.eigvalsh(hessian[start:end, start:end])[-1].item()
        assert got["top_eigenvalue"] == pytest.approx(top, rel=2e-3), layer  # tolerance 1e-3
        start = end
    assert list(details["per_layer"])[-1] == "fc" and start == 492
    grid, density = np.array(details["grid"]), np.array(details["density"])
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=3e-3)
    # Hutch++ in stats.hutchinson_probes products, replayed on the explicit Hessian: S and G are
    # the first and second third of the probes.
    k = options.stats.hutchinson_probes // 3
    generator = torch.Generator().manual_seed(options.stats.curvature_seed)
    s, g = (
        torch.stack(
            [torch.randint(0, 2, (492,), generator=generator) * 2.0 - 1 for _ in range(k)], 1
        ).double()
        for _ in range(2)
    )
    q, _ = torch.linalg.qr(hessian @ s)
    g = g - q @ (q.T @ g)
    quadratic = torch.einsum("ik,ij,jk->k", g, hessian, g)
    want = torch.trace(q.T @ hessian @ q) + quadratic.mean()
    assert summary["hessian_trace_hutchpp"] == pytest.approx(want.item(), rel=1e-9)
    se = quadratic.std() / k**0.5
    assert summary["hessian_trace_hutchpp_se"] == pytest.approx(se.item(), rel=1e-9)
    assert abs(want - torch.trace(hessian)) < 4 * se  # an estimate of the trace


def test_loss_curvature_through_stats(workdir, run_id):
    args = ["--metric", "loss_curvature", "hessian_spectrum", "--curvature-samples", "200"]
    args += ["--hutchinson-probes", "10", "--spectrum-probes", "2", "--spectrum-steps", "10"]
    assert cli.main(["stats", "--run-id", run_id, *args, *STATS]) == 0
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    keys = MEASURES["loss_curvature"].keys + MEASURES["hessian_spectrum"].keys
    for key in keys:
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 2], key
    spectrum = json.loads((workdir / "out/hessian_spectrum-checkpoint-1.json").read_text())
    assert len(spectrum["grid"]) == len(spectrum["density"]) == 400
    assert np.array(spectrum["nodes"]).shape == (2, 10)
    last = json.loads((workdir / "out/loss_curvature-checkpoint-1.json").read_text())
    assert last["training_points"] == 200 and len(last["trace_samples"]) == 10
    assert last["summary"]["hessian_top_eigenvalue"] > 0
