"""Probe sets: each point rebuilt by hand from its definition (the double_descent study's own
torchvision pipeline for the shifts), deterministic for its seed, measured exactly, and through
`lipdd stats` to result files and MLflow."""

import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from lipdd import cli, config
from lipdd.data import random_pixels
from lipdd.data.loader import normalize
from lipdd.measures.jacobian import input_jacobian
from lipdd.measures.probes import PROBES, Points, angles
from lipdd.models import build_model
from lipdd.stats.compute import measure_points
from lipdd.tracking import get_client

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def options(**overrides):
    return config.build({f"stats.{k}": v for k, v in overrides.items()}, environ={}).stats


@pytest.fixture(scope="module")
def images():
    """20 uint8 CIFAR-shaped images (NCHW), half of them with corrupted labels."""
    return torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (20, 3, 12, 12), dtype=np.uint8)
    )


@pytest.fixture(scope="module")
def points(images):
    targets = torch.tensor([0, 1, 2, 0, 1] * 4)
    return Points(
        normalize(images, MEAN, STD),
        targets,
        np.arange(100, 120),
        np.arange(20) % 2 == 1,
        MEAN,
        STD,
        3,
    )


def test_between_points_are_the_convex_combinations_they_name(points):
    probe = PROBES["between"](points, options(probe_lambdas=[0.25, 0.5, 1.0], probe_seed=3))
    prov = probe.provenance
    assert (
        len(prov["lambda"]) == 20 * 2 * 3
    )  # a partner within the class and one across, 3 lambdas each
    labels = points.targets.numpy()
    for p in range(0, len(prov["lambda"]), 7):
        i, j, lam = prov["sample_i"][p] - 100, prov["sample_j"][p] - 100, prov["lambda"][p]
        assert torch.allclose(probe.x[p], lam * points.x[i] + (1 - lam) * points.x[j], atol=1e-6)
        assert (labels[i] == labels[j]) == (prov["pair"][p] == "within") and i != j
        assert probe.targets[p] == (labels[i] if lam >= 0.5 else labels[j])
        assert prov["corrupted_endpoints"][p] == int(points.corrupted[i]) + int(points.corrupted[j])
    at_one = np.array(prov["lambda"]) == 1.0
    firsts = np.array(prov["sample_i"])[at_one] - 100
    assert torch.equal(
        probe.x[torch.from_numpy(at_one)], points.x[firsts]
    )  # lambda = 1: the training point itself
    assert (
        probe.groups["clean"].sum() + probe.groups["mixed"].sum() + probe.groups["corrupted"].sum()
        == 120
    )
    # Deterministic for its seed, another seed draws other partners.
    again = PROBES["between"](points, options(probe_lambdas=[0.25, 0.5, 1.0], probe_seed=3))
    assert torch.equal(again.x, probe.x) and again.provenance == prov
    assert (
        PROBES["between"](points, options(probe_lambdas=[0.5], probe_seed=4)).provenance["sample_j"]
        != PROBES["between"](points, options(probe_lambdas=[0.5], probe_seed=3)).provenance[
            "sample_j"
        ]
    )


def study_shift(image_u8: torch.Tensor, radius: int, angle: float) -> torch.Tensor:
    """The double_descent study's ShiftTransform on one image, as it runs: torchvision on a PIL
    image (edge padding, affine translation, centre crop)."""
    pil = Image.fromarray(image_u8.permute(1, 2, 0).numpy())
    padded = TF.pad(pil, padding=2 * radius, padding_mode="edge")
    moved = TF.affine(
        padded,
        angle=0,
        translate=(radius * math.cos(angle), radius * math.sin(angle)),
        scale=1,
        shear=0,
    )
    return torch.from_numpy(np.array(TF.center_crop(moved, list(image_u8.shape[1:])))).permute(
        2, 0, 1
    )


@pytest.mark.parametrize("name, radius, directions", [("shift1", 1, 6), ("shift4", 4, 12)])
def test_shifts_are_the_studys_translations(images, points, name, radius, directions):
    # 6 and 12 directions include angles whose translations fall on half pixels (cos 60 degrees =
    # 0.5).
    probe = PROBES[name](points, options(probe_directions=directions))
    x = probe.x.view(20, directions + 1, 3, 12, 12)
    assert torch.equal(x[:, 0], points.x)
    for n in (0, 7, 19):
        for k, angle in enumerate(angles(directions)):
            want = normalize(study_shift(images[n], radius, angle)[None], MEAN, STD)[0]
            assert torch.equal(x[n, k + 1], want), (n, k)
    assert probe.provenance["direction"][: directions + 1] == [-1, *range(directions)]
    # The study's integral: the mean over directions of (f(x) + f(x_k)) / 2.
    values = np.random.default_rng(1).random(20 * (directions + 1))
    v = values.reshape(20, directions + 1)
    (reduced,) = probe.reduce(values).values()
    assert reduced == pytest.approx(
        [np.mean([(v[n, 0] + v[n, k]) / 2 for k in range(1, directions + 1)]) for n in range(20)],
        rel=1e-12,
    )


def test_shift_paths_integrate_along_the_path(images, points):
    probe = PROBES["shift_path"](points, options(probe_directions=3))
    x = probe.x.view(20, 3, 5, 3, 12, 12)
    for k, angle in enumerate(angles(3)):
        for a, radius in enumerate((1, 2, 3, 4)):
            want = normalize(study_shift(images[5], radius, angle)[None], MEAN, STD)[0]
            assert torch.equal(x[5, k, a + 1], want)
    values = np.random.default_rng(2).random(20 * 3 * 5)
    f = values.reshape(20, 3, 5)
    reduced = probe.reduce(values)
    for n in (0, 11):
        integrals = []
        for k in range(3):
            d = [
                torch.linalg.vector_norm(x[n, k, a + 1].double() - x[n, k, a].double()).item()
                for a in range(4)
            ]
            integrals.append(
                sum((f[n, k, a] + f[n, k, a + 1]) / 2 * d[a] for a in range(4)) / sum(d)
            )
        assert reduced[""][n] == pytest.approx(np.mean(integrals), rel=1e-6)
        assert reduced["plain"][n] == pytest.approx(f[n].mean(), rel=1e-12)


@pytest.mark.parametrize("kind", ["uniform", "normal", "ball"])
def test_random_inputs_are_drawn_like_upstreams_random_datasets(points, kind):
    probe = PROBES[f"random_{kind}"](points, options(probe_seed=7))
    rng = np.random.default_rng(7)
    pixels = random_pixels(
        "hypersphere" if kind == "ball" else kind, 20, (12, 12, 3), MEAN, STD, rng
    )
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(probe.x, (torch.from_numpy(pixels).float() - mean) / std, atol=1e-5)
    assert probe.targets.tolist() == rng.integers(0, 3, 20).tolist()
    if kind == "uniform":  # mean +- std in pixels: [-1, 1] once normalised
        assert probe.x.abs().max() <= 1 + 1e-6 and probe.x.abs().max() > 0.99
    if kind == "ball":  # each sample's channel lies in the unit ball of pixel space
        assert torch.linalg.vector_norm(torch.from_numpy(pixels).flatten(2), dim=2).max() <= 1
    assert torch.equal(PROBES[f"random_{kind}"](points, options(probe_seed=7)).x, probe.x)


def test_probe_points_operator_norm_is_the_float64_svd_of_the_jacobian(points):
    torch.manual_seed(0)
    model = build_model("cnn5", 2, 3, 3).eval()
    probe = PROBES["shift1"](points, options(probe_directions=2))
    s = options(metric=["jacobian_operator_norm"], normalization=["none", "softmax"], batch_size=16)
    values = measure_points(model, probe.x, probe.targets, s)
    double = build_model("cnn5", 2, 3, 3).double().eval()
    double.load_state_dict(model.state_dict())
    for p in (0, 13, 59):
        jac = input_jacobian(double, probe.x[p : p + 1].double(), probe.targets[p : p + 1])[
            0
        ].flatten(1)
        assert values["jacobian_operator_norm", "none"][p] == pytest.approx(
            torch.linalg.svdvals(jac)[0].item(), rel=1e-5
        )


# --- through lipdd stats: files, MLflow, the worst input found ------------------------------------

STATS = ["--num-samples=100", "--batch-size=50", "--output-dir=out", "--device=cpu"]


@pytest.fixture
def run_id(tiny_run):
    return tiny_run


def read(workdir, name):
    return json.loads((workdir / "out" / name).read_text())


def test_probes_through_stats(workdir, run_id):
    args = [
        "--metric",
        "jacobian_operator_norm",
        "accuracy",
        "lipschitz_upper_bound",
        "--normalization",
        "none",
        "--probes",
        "between",
        "worst",
        "shift1",
        "--probe-lambdas",
        "1",
        "0.5",
        "--probe-samples",
        "30",
        "--curvature-samples",
        "30",
        "--worst-steps",
        "4",
        "--num-directions",
        "4",
    ]
    # every training point (the probes' 30 are drawn from the whole split)
    assert (
        cli.main(
            [
                "stats",
                "--run-id",
                run_id,
                *args,
                "--batch-size=250",
                "--output-dir=out",
                "--device=cpu",
            ]
        )
        == 0
    )
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    metrics = client.get_run(run_id).data.metrics
    for checkpoint, epoch in ((0, 0), (1, 2)):
        # lambda = 1 reproduces the training points' own values: each first endpoint's.
        train_file = read(workdir, f"jacobian_operator_norm-train-checkpoint-{checkpoint}.json")
        on_train = dict(zip(train_file["sample_ids"], (v for (v,) in train_file["stats"])))
        between = read(
            workdir, f"jacobian_operator_norm-train-probe_between-checkpoint-{checkpoint}.json"
        )
        prov = between["provenance"]
        at_one = [
            (i, v)
            for i, lam, (v,) in zip(prov["sample_i"], prov["lambda"], between["stats"])
            if lam == 1
        ]
        assert len(at_one) == 60 and all(i in on_train for i, _ in at_one)
        assert [v for _, v in at_one] == [on_train[i] for i, _ in at_one]  # bitwise
        assert between["metadata"]["sampling-strategy"] == "between"
        accuracy = read(workdir, f"accuracy-train-probe_between-checkpoint-{checkpoint}.json")
        assert len(accuracy["stats"]) == len(between["stats"]) == 120
        # The worst input found: never below its training point's norm, never above the upper bound.
        worst = read(
            workdir, f"jacobian_operator_norm-train-probe_worst-checkpoint-{checkpoint}.json"
        )
        bound = read(workdir, f"lipschitz_upper_bound-checkpoint-{checkpoint}.json")["summary"][
            "lipschitz_upper_bound"
        ]
        start = dict(at_one)
        for i, (v,), d in zip(
            worst["provenance"]["sample"], worst["stats"], worst["provenance"]["distance"]
        ):
            assert start[i] <= v <= bound and d <= 1.0 + 1e-5
        shift = read(
            workdir, f"jacobian_operator_norm-train-probe_shift1-checkpoint-{checkpoint}.json"
        )
        assert len(shift["stats"]) == 30 * 5 and len(shift["per_training_point"]) == 30
        summary = shift["summary"]
        assert summary["mean"] == pytest.approx(np.mean(shift["per_training_point"]), rel=1e-12)
        history = {
            m.step: m.value
            for m in client.get_metric_history(
                run_id, "probe_shift1_jacobian_operator_norm_none_mean"
            )
        }
        assert history[epoch] == pytest.approx(summary["mean"])
    assert (
        worst["summary"]["mean"]
        > read(workdir, "jacobian_operator_norm-train-probe_between-checkpoint-1.json")["summary"][
            "lambda100_mean"
        ]
    )  # the ascent found larger norms than the training points'
    assert {
        "probe_worst_jacobian_operator_norm_none_max",
        "probe_between_accuracy_mean",
        "probe_between_jacobian_operator_norm_none_clean_mean",
    } <= set(metrics)


def test_probes_need_a_per_sample_measure(workdir, run_id, capsys):
    assert (
        cli.main(
            [
                "stats",
                "--run-id",
                run_id,
                "--metric",
                "distance_from_init",
                "--probes",
                "between",
                *STATS,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        "stats.probes: between are measured with the per-sample measures" in err and "\n" not in err
    )
    assert not (workdir / "out").exists()
    # --probes with no value: none, over params.yaml's list, and the per-network measure runs.
    params = workdir / "probing.yaml"
    params.write_text("stats:\n  probes: [between, shift1]\n")
    args = ["stats", "--params", str(params), "--run-id", run_id, "--metric", "distance_from_init"]
    assert cli.main([*args, *STATS]) == 2
    assert cli.main([*args, "--probes", *STATS]) == 0
    assert (workdir / "out/distance_from_init-checkpoint-1.json").exists()
