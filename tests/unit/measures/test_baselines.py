"""The baseline generalisation measures (lipdd.measures.baselines and their registry entries)
against explicit float64 computations: batch norm folded by hand, each convolution's matrix built
column by column, margins sorted, the path norm summed layer by layer, and the PAC-Bayes search
replayed on a network whose accuracy under noise is known."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explicit import explicit_norm, with_running_stats
from lipdd import cli, config
from lipdd.measures import MEASURES, Network, baselines
from lipdd.models import build_model
from lipdd.tracking import get_client

OPTIONS = config.build({}, environ={}).stats
STATS = ["--num-samples=100", "--batch-size=50", "--output-dir=out", "--device=cpu"]


def trained_pair(family="cnn5", batch_norm=True):
    """(a network, its 'initial' state dict): two draws, batch norm statistics far from the
    defaults in both."""
    torch.manual_seed(0)
    start = with_running_stats(build_model(family, 1, 1, 10, batch_norm=batch_norm))
    model = with_running_stats(build_model(family, 1, 1, 10, batch_norm=batch_norm))
    return model, start.state_dict()


def network(model, initial, points=100):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(points, 1, 8, 8, generator=generator)
    y = torch.randint(0, 10, (points,), generator=generator)
    return Network(model, lambda: initial, (1, 8, 8), lambda: (x, y), OPTIONS)


def folded_by_hand(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) of cnn5's convolutions with batch norm folded, and of its linear layer."""
    out = []
    for block in (model.layer1, model.layer2, model.layer3, model.layer4):
        bn, w = block.bn, block.conv.weight.double()
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        out.append((w * scale[:, None, None, None], bn.bias.double() - scale * bn.running_mean))
    out.append((model.fc.weight.double(), model.fc.bias.double()))
    return out


CONV_INPUTS = [(1, 8, 8), (1, 8, 8), (2, 4, 4), (4, 2, 2)]  # cnn5 of width 1 on 8x8 inputs


def conv_norm(w, shape) -> float:
    return explicit_norm(lambda x: F.conv2d(x, w, padding=1), shape)


@pytest.mark.parametrize("family", ["cnn5", "resnet18"])
def test_folding_keeps_the_function_and_drops_every_batch_norm(family):
    model, _ = trained_pair(family)
    net, layers = baselines.folded(model)
    x = torch.randn(20, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(net(x), model.double()(x), rtol=1e-12, atol=1e-12)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # folded a copy
    if family == "cnn5":
        assert list(layers) == [f"layer{i}.conv" for i in range(1, 5)] + ["fc"]
    else:  # the stem, two convolutions per block, a shortcut per stage after the first, the head
        assert len(layers) == 1 + 8 * 2 + 3 + 1 and list(layers)[-1] == "fc"


def test_weight_norms_against_explicit_matrices():
    model, initial = trained_pair()
    summary, details = MEASURES["weight_norms"].fn(network(model, initial))
    start = build_model("cnn5", 1, 1, 10, batch_norm=True)
    start.load_state_dict(initial)
    layers, layers0 = folded_by_hand(model.double()), folded_by_hand(start.double())
    norms = {"spectral": [], "frobenius": []}
    distances = {"spectral": 0.0, "frobenius": 0.0}
    for i, ((w, _), (w0, _)) in enumerate(zip(layers, layers0)):
        if i < 4:
            spectral, moved = conv_norm(w, CONV_INPUTS[i]), conv_norm(w - w0, CONV_INPUTS[i])
        else:
            spectral, moved = (torch.linalg.svdvals(m)[0].item() for m in (w, w - w0))
        norms["spectral"].append(spectral)
        norms["frobenius"].append(w.norm().item())
        distances["spectral"] += moved**2
        distances["frobenius"] += (w - w0).square().sum().item()
    assert [r["input_shape"] for r in details["per_layer"]] == [*map(list, CONV_INPUTS), [8]]
    got = [r["spectral"] for r in details["per_layer"]]
    assert got == pytest.approx(norms["spectral"], rel=1e-9)

    x, y = network(model, initial).training_points()
    logits = model.double()(x.double()).detach().numpy()
    labelled = logits[np.arange(100), y.numpy()]
    logits[np.arange(100), y.numpy()] = -np.inf
    gamma = abs(np.sort(labelled - logits.max(1))[100 // 10 - 1])
    d = 5
    want = {
        "weight_count": 9 + 18 + 72 + 288 + 80,
        "weight_l2_norm": math.sqrt(sum(n**2 for n in norms["frobenius"])),
        "path_norm": path_norm_by_hand(layers),
    }
    want["path_norm_over_margin"] = want["path_norm"] / gamma**2
    for norm, values in norms.items():
        log_prod = sum(math.log(v**2) for v in values)
        want[f"log_prod_{norm}"] = log_prod
        want[f"log_sum_{norm}"] = math.log(d) + log_prod / d
        want[f"log_prod_{norm}_over_margin"] = log_prod - 2 * math.log(gamma)
        want[f"log_sum_{norm}_over_margin"] = math.log(d) + (log_prod - 2 * math.log(gamma)) / d
        want[f"{norm}_distance"] = distances[norm]
    assert set(summary) == set(want) == set(MEASURES["weight_norms"].keys)
    for key, value in want.items():
        assert summary[key] == pytest.approx(value, rel=1e-9), key

    margin, _ = MEASURES["output_margin"].fn(network(model, initial))
    assert margin == pytest.approx({"output_margin": gamma, "inverse_margin": gamma**-2}, rel=1e-12)


def path_norm_by_hand(layers) -> float:
    """Every weight and bias squared, cnn5's forward pass by hand on an input of ones (its ReLUs
    pass nonnegative values unchanged; pooling keeps its own coefficients)."""
    v = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    for i, (w, b) in enumerate(layers[:4]):
        v = F.conv2d(v, w.square(), b.square(), padding=1)
        if i in (1, 2):
            v = F.avg_pool2d(v, 2)
    w, b = layers[4]
    return (v.mean((2, 3)) @ w.square().T + b.square()).sum().item()


@pytest.mark.parametrize(
    "drop, sigma",
    [
        (lambda s: s / 4, 0.375),  # 1: too much, 0.5: too much, 0.25: too little, 0.375: in range
        (lambda s: 0.0, 2 - 2 / 2**15),  # never perturbed enough: the upper end, 15 halvings in
        (lambda s: 1.0, 2 / 2**15),  # always too much
    ],
)
def test_sigma_bisection_by_hand(drop, sigma):
    assert baselines.bisect_sigma(drop) == sigma


class Threshold(torch.nn.Module):
    """Logits (w, 0) on every point, all labelled 0: a network is right everywhere when its one
    weight is positive, and wrong everywhere otherwise."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x):
        return torch.stack([self.w * x[:, 0], torch.zeros(len(x), dtype=x.dtype)], 1)


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_pacbayes_sigma_replayed_by_hand(eps):
    """Each perturbed network is right iff 1 + u > 0, u ~ N(0, σ²) (or σ² + ε² for w = 1): the
    search is replayed with the same generator, one draw per parameter per network."""
    x, y = torch.ones(5, 1, dtype=torch.float64), torch.zeros(5, dtype=torch.long)
    net = Threshold()
    got = baselines.pacbayes_sigma(net, x, y, torch.Generator().manual_seed(3), eps)
    assert net.w.item() == 1.0  # left as it was

    generator, lower, upper = torch.Generator().manual_seed(3), 0.0, 2.0
    for _ in range(15):
        sigma = (lower + upper) / 2
        std = sigma if eps is None else math.sqrt(sigma**2 + eps**2)
        noise = [torch.randn((), generator=generator, dtype=torch.float64) for _ in range(10)]
        drop = sum(1 + std * u.item() <= 0 for u in noise) / 10
        if abs(drop - 0.1) < 0.01:
            break
        lower, upper = (lower, sigma) if drop > 0.1 else (sigma, upper)
    assert got == pytest.approx(sigma, rel=1e-15) and 0.1 < got < 2  # the search did something


def test_pacbayes_bounds_from_their_sigmas():
    model, initial = trained_pair()
    summary, details = MEASURES["pacbayes"].fn(network(model, initial))
    start = build_model("cnn5", 1, 1, 10, batch_norm=True)
    start.load_state_dict(initial)
    with torch.no_grad():
        w = torch.cat([w.flatten() for w, _ in folded_by_hand(model.double())])
        w0 = torch.cat([w.flatten() for w, _ in folded_by_hand(start.double())])
    m, eps, omega = 100, 1e-3, len(w)
    assert details == {"training_points": m, "weights": omega}
    sigma, mag = summary["pacbayes_sigma"], summary["pacbayes_mag_sigma"]
    want = {"pacbayes_sigma": sigma, "pacbayes_mag_sigma": mag}
    want["pacbayes_flatness"], want["pacbayes_mag_flatness"] = sigma**-2, mag**-2
    for kind, v in (("init", w - w0), ("orig", w)):
        want[f"pacbayes_{kind}"] = v.square().sum() / (4 * sigma**2) + math.log(m / sigma) + 10
        ratio = (eps**2 + (mag**2 + 1) * v.square().sum() / omega) / (
            eps**2 + mag**2 * (w - w0).square()
        )
        want[f"pacbayes_mag_{kind}"] = ratio.log().sum() / 4 + math.log(m / mag) + 10
    assert set(summary) == set(MEASURES["pacbayes"].keys)
    assert summary == pytest.approx({k: float(v) for k, v in want.items()}, rel=1e-12)


def test_baselines_through_stats(workdir, tiny_run):
    args = ["--metric", "output_margin", "weight_norms", "pacbayes", "--curvature-samples", "200"]
    assert cli.main(["stats", "--run-id", tiny_run, *args, *STATS]) == 0
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    for name in ("output_margin", "weight_norms", "pacbayes"):
        for key in MEASURES[name].keys:
            assert [m.step for m in client.get_metric_history(tiny_run, key)] == [0, 2], key
    last = json.loads((workdir / "out/weight_norms-checkpoint-1.json").read_text())
    assert [r["layer"] for r in last["per_layer"]][-1] == "fc"
    pacbayes = json.loads((workdir / "out/pacbayes-checkpoint-1.json").read_text())
    assert pacbayes["training_points"] == 200
