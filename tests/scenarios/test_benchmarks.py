"""The benchmarks' baselines are upstream's algorithms, computed right: a ratio against a wrong or
broken baseline would be meaningless. Small sizes; the benchmarks themselves time the real ones."""

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_measures  # noqa: E402
import bench_stats  # noqa: E402
import bench_train  # noqa: E402
from lipdd.models import build_model  # noqa: E402


def exact_jacobians(model, x):
    """(N, D, K) by torch.autograd.functional.jacobian, one sample at a time."""
    return torch.stack(
        [torch.autograd.functional.jacobian(lambda s: model(s[None])[0], s).flatten(1).T for s in x]
    )


@pytest.mark.parametrize("family", ["cnn5", "resnet18"])
def test_upstream_jacobians_are_the_jacobian(family):
    torch.manual_seed(0)
    model = build_model(family, 2, 3, bench_stats.K).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    want = exact_jacobians(model, x)
    assert want.shape == (3, 3 * 8 * 8, bench_stats.K)
    for upstream_jacobian in (
        bench_stats.upstream_jacobian_lowmem,
        bench_stats.upstream_jacobian_bigmem,
    ):
        torch.testing.assert_close(upstream_jacobian(model, x), want, rtol=1e-10, atol=1e-12)
        assert all(p.grad is None for p in model.parameters())


def test_upstream_power_iteration_as_upstream_has_it():
    """Zero for every sample whose norm is below its 1e-2 tolerance; otherwise a Rayleigh
    quotient of unit vectors, so never above the largest singular value."""
    g = torch.Generator().manual_seed(0)
    J = torch.randn(6, 50, bench_stats.K, generator=g, dtype=torch.float64)
    J[:3] *= 1e-4 / torch.linalg.matrix_norm(J[:3], ord=2)[:, None, None]
    sigma = torch.linalg.matrix_norm(J, ord=2)
    estimate = bench_stats.upstream_operator_norm(J)
    assert torch.equal(estimate[:3], torch.zeros(3, dtype=torch.float64))
    assert (estimate[3:] > 0).all() and (estimate[3:] <= sigma[3:] * (1 + 1e-12)).all()


def test_jacobian_work_counts_one_forward_and_k_backward_passes_to_the_input():
    """A convolution (3 out of 2 channels, 3x3, 4x4 outputs) and a linear layer to K = 4 logits:
    each backward pass to the input costs what the forward pass costs, with no weight gradient."""
    c_in, c_out, side, k = 2, 3, 4, 4
    net = torch.nn.Sequential(
        torch.nn.Conv2d(c_in, c_out, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(c_out * side * side, k),
    ).requires_grad_(False)
    forward = 2 * c_out * c_in * 9 * side * side + 2 * c_out * side * side * k
    work = bench_stats.jacobian_work(net, torch.randn(5, c_in, side, side))
    assert work == forward * (1 + k)


def test_both_training_pipelines_train():
    split, mean, std = bench_train.cifar_like(2 * bench_train.BATCH)
    device = torch.device("cpu")
    torch.manual_seed(0)
    models = {"seed": build_model("cnn5", 2, 3, 10), "ours": build_model("cnn5", 2, 3, 10)}
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in models.items()}
    trainers = {
        "seed": bench_train.UpstreamTrainer(models["seed"], split, mean, std),
        "ours": bench_train.OurTrainer(models["ours"], split, mean, std, device, batches=2),
    }
    assert {name: t.run(2, device) for name, t in trainers.items()} == {"seed": 256, "ours": 256}
    for name, m in models.items():
        assert all(not torch.equal(a, b) for a, b in zip(before[name], m.parameters())), name


def test_logging_overhead_is_timed_inside_a_real_training(workdir, capsys):
    overhead = bench_train.bench_logging(argparse.Namespace(quick=True), torch.device("cpu"))
    assert 0 < overhead < 0.2
    # 100 epochs of 8 batch losses and their mean; 11 evaluations of 11 metrics, and the learning
    # rate after epoch 0; again under overview/: the 100 means and the 11 x 2 errors
    assert "\n    1153 " in capsys.readouterr().out


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 1), (2, 0)])
def test_sparse_reference_matrices_are_the_layers_maps(stride, padding):
    """bench_measures' explicit matrices: a convolution's and a pooling's, against the layers."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, stride=stride, padding=padding, bias=False).double()
    x = torch.randn(3, 7, 7, dtype=torch.float64)
    got = bench_measures.conv_matrix(conv, (3, 7, 7)) @ x.flatten().numpy()
    assert np.allclose(got, conv(x[None]).flatten().detach().numpy(), rtol=1e-12, atol=1e-12)
    pooled = bench_measures.pool_matrix((3, 8, 8), 2) @ torch.arange(192.0).numpy()
    assert np.allclose(
        pooled, torch.nn.functional.avg_pool2d(torch.arange(192.0).view(1, 3, 8, 8), 2).flatten()
    )
