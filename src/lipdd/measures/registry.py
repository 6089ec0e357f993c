"""What `lipdd stats` can measure: a registry of measures, each one function.

A measure has a name (what `stats.metric` selects and result files are called), a kind and the
stats options it reads:
- "sample": fn(batch, **options) -> (B,) tensor, one value per sample of a `Batch`; a measure with
  the option "normalization" gives one statistic per normalization asked for (names.stat);
- "network": fn(network) -> (summary, details): named floats for MLflow and the summary files, and
  anything JSON-able (per-layer values, ...) for the checkpoint's result file; a measure with the
  option "initial" reads the initial network, so the run needs its epoch-0 checkpoint; one with
  "training_points" reads the seeded subset of training points (stats.curvature_samples).

A new measure is one function below and one entry in MEASURES; `lipdd stats --metric NAME` then
computes it at every chosen checkpoint, writes its result files and logs its summaries.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..names import LOGGED_SUMMARIES, NORMALIZATIONS, OPNORM, bound_ratio
from . import baselines, curvature, jacobian, lipschitz


@dataclass(frozen=True)
class Measure:
    name: str
    kind: str  # "sample" | "network"
    fn: Callable
    options: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()  # a network measure's summary keys (what it logs to MLflow)
    logged: tuple[str, ...] = LOGGED_SUMMARIES  # a per-sample measure's summaries sent to MLflow
    probe_logged: tuple[str, ...] = ()  # ... of its values on each probe set
    # a network measure's summaries that relate it to the same checkpoint's per-sample values:
    # fn(summary, {(measure, normalization): values}, stats options) -> {key: value}
    relate: Callable | None = None
    # one of the field's generalisation measures the Lipschitz ones are compared with (the report
    # draws them apart)
    baseline: bool = False


class Batch:
    """A batch of samples as the per-sample measures see it. The model's logits and, when any
    normalization is asked for, the input Jacobians of all of them are computed once, on first
    use, and shared by every measure: one forward pass and K backward rows (jacobian.jacobians)."""

    def __init__(
        self,
        model,
        x,
        targets,
        normalizations=(),
        target_logit_only=False,
        bigmem=False,
        precision="fp32",
    ):
        self.model, self.x, self.targets = model, x, targets
        self.normalizations = tuple(dict.fromkeys(normalizations))
        self.target_logit_only, self.bigmem, self.precision = target_logit_only, bigmem, precision

    @cached_property
    def _outputs(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.normalizations:  # the logits come from the Jacobians' own forward pass
            return jacobian.jacobians(
                self.model,
                self.x,
                self.targets,
                self.normalizations,
                self.target_logit_only,
                self.bigmem,
                self.precision,
            )
        with torch.no_grad():
            return self.model(self.x), {}

    @property
    def logits(self) -> torch.Tensor:
        return self._outputs[0]

    @property
    def jacobians(self) -> dict[str, torch.Tensor]:
        """{normalization: (B, K', D) Jacobian of each sample's normalised output w.r.t. its
        input}."""
        return self._outputs[1]


@dataclass
class Network:
    """A checkpoint as the per-network measures see it: the model (eval mode), the initial
    network's parameters, the shape of one input, a fixed seeded subset of the training points
    (normalised inputs and the labels trained on) and the stats options."""

    model: torch.nn.Module
    initial: Callable[[], dict[str, torch.Tensor]]  # state dict of epoch 0, loaded on first call
    input_shape: tuple[int, int, int]  # (C, H, W)
    training_points: Callable[[], tuple[torch.Tensor, torch.Tensor]] = None  # loaded on first call
    options: object = None  # config.StatsConfig


# --- per sample -----------------------------------------------------------------------------------


def jacobian_operator_norm(batch: Batch, normalization: str) -> torch.Tensor:
    """Largest singular value of the K' x D input Jacobian (exact)."""
    return jacobian.operator_norm(batch.jacobians[normalization])


def jacobian_frobenius_norm(batch: Batch, normalization: str) -> torch.Tensor:
    """Frobenius norm of the K' x D input Jacobian."""
    return torch.linalg.vector_norm(batch.jacobians[normalization], dim=(1, 2))


def accuracy(batch: Batch) -> torch.Tensor:
    """1 where the largest logit is the label's, else 0."""
    return (batch.logits.argmax(-1) == batch.targets).to(batch.logits.dtype)


def crossentropy(batch: Batch) -> torch.Tensor:
    return F.cross_entropy(batch.logits, batch.targets, reduction="none")


def confidence(batch: Batch) -> torch.Tensor:
    """Euclidean distance of the softmax output from the one-hot label."""
    onehot = F.one_hot(batch.targets, batch.logits.shape[1]).to(batch.logits.dtype)
    return torch.linalg.vector_norm(batch.logits.softmax(-1) - onehot, dim=-1)


# --- per network ----------------------------------------------------------------------------------


def distance_from_init(network: Network) -> tuple[dict[str, float], dict]:
    """||theta_t - theta_0||_2 over all parameters, the same over ||theta_0||_2, and ||theta_t||_2
    (float64); per parameter tensor in the details."""
    initial = network.initial()
    per_layer, sums = {}, torch.zeros(3, dtype=torch.float64)
    for name, p in network.model.named_parameters():
        p, p0 = p.detach().double(), initial[name].double().to(p.device)
        squares = torch.stack([(p - p0).square().sum(), p0.square().sum(), p.square().sum()]).cpu()
        sums += squares
        per_layer[name] = dict(zip(("distance", "initial_norm", "norm"), squares.sqrt().tolist()))
    distance, initial_norm, norm = sums.sqrt().tolist()
    summary = {
        "distance_from_init": distance,
        "distance_from_init_relative": distance / initial_norm,
        "parameter_norm": norm,
    }
    return summary, {"per_layer": per_layer}


def lipschitz_upper_bound(network: Network) -> tuple[dict[str, float], dict]:
    """Upper bound on the l2 Lipschitz constant of the logits w.r.t. the normalised input: the
    product of the exact spectral norms of the linear maps between ReLUs (lipdd.measures.lipschitz),
    each map's norm in the details. The softmax outputs' bound is half of it: softmax's Jacobian
    diag(p) - p p^T has spectral norm at most 1/2."""
    bound, maps = lipschitz.upper_bound(network.model, network.input_shape)
    return {"lipschitz_upper_bound": bound, "lipschitz_upper_bound_softmax": bound / 2}, {
        "maps": maps
    }


def bound_over_max(summary: dict, values: dict, options) -> dict[str, float]:
    """The upper bound over the largest per-sample operator norm (the empirical lower bound) of
    the same checkpoint: how far apart the two bounds are. None with target_logit_only, whose
    per-sample Jacobian is the labelled logit's alone."""
    if options.target_logit_only:
        return {}
    return {
        bound_ratio(n): summary[bound_ratio(n).removesuffix("_over_max")] / float(v.max())
        for n in ("none", "softmax")
        if (v := values.get((OPNORM, n))) is not None
    }


def loss_curvature(network: Network) -> tuple[dict[str, float], dict]:
    """Curvature of the mean cross-entropy L(theta) on the training subset (the labels trained on,
    the network in eval mode): the top-k eigenvalues of the Hessian (lipdd.measures.lanczos on
    Hessian-vector products, to the relative tolerance stats.curvature_tolerance), its trace by
    Hutchinson's estimator (mean of v^T H v over stats.hutchinson_probes seeded Rademacher v) with
    its standard error, and the gradient norm ||grad L||; in the details, each layer's share of
    the trace (the trace of its diagonal block, from the same probes)."""
    s = network.options
    hessian = curvature.Hessian(network.model, *network.training_points())
    eigenvalues, steps = hessian.top_eigenvalues(
        s.curvature_top_k, s.curvature_tolerance, s.curvature_seed, s.curvature_memory << 20
    )
    quadratic, per_block = hessian.hutchinson(s.hutchinson_probes, s.curvature_seed)
    per_layer = {
        block: {
            "parameters": size,
            "trace": float(per_block[:, i].mean()),
            "trace_se": float(per_block[:, i].std(ddof=1) / np.sqrt(len(per_block))),
        }
        for i, (block, size) in enumerate(hessian.blocks.items())
    }
    summary = {
        "hessian_top_eigenvalue": eigenvalues[0],
        "hessian_trace": float(quadratic.mean()),
        "hessian_trace_se": float(quadratic.std(ddof=1) / np.sqrt(len(quadratic))),
        "gradient_norm": hessian.gradient_norm,
    }
    return summary, {
        "eigenvalues": eigenvalues,
        "lanczos_steps": steps,
        "trace_samples": quadratic.tolist(),
        "parameters": hessian.size,
        "training_points": hessian.samples,
        "tolerance": s.curvature_tolerance,
        "per_layer": per_layer,
    }


SPECTRUM_GRID, SPECTRUM_KERNEL = 400, 0.01  # hessian_spectrum's density: grid points, kernel width


def hessian_spectrum(network: Network) -> tuple[dict[str, float], dict]:
    """The eigenvalue density of the same Hessian as loss_curvature's, by stochastic Lanczos
    quadrature (lipdd.measures.curvature.Hessian.spectrum: stats.spectrum_probes Rademacher
    vectors seeded stats.curvature_seed, stats.spectrum_steps Lanczos steps each): its first
    moments (the first is the trace over the parameter count), the mass below zero, and in the
    details the density on a grid of SPECTRUM_GRID points (kernel width SPECTRUM_KERNEL of the
    range) with the quadrature's nodes and weights, and the top eigenvalue of each layer's
    diagonal block of H (to stats.curvature_tolerance; loss_curvature has their traces); and the
    trace by Hutch++ in as many products as loss_curvature's Hutchinson (stats.hutchinson_probes),
    with the standard error of its random part."""
    s = network.options
    hessian = curvature.Hessian(network.model, *network.training_points())
    nodes, weights = hessian.spectrum(s.spectrum_probes, s.spectrum_steps, s.curvature_seed)
    moments = curvature.moments(nodes, weights, 5)
    grid, values = curvature.density(nodes, weights, SPECTRUM_GRID, SPECTRUM_KERNEL)
    trace, trace_se = hessian.hutchplusplus(s.hutchinson_probes, s.curvature_seed)
    per_layer = {}
    for block, size in hessian.blocks.items():
        top, steps = hessian.block_top_eigenvalue(block, s.curvature_tolerance, s.curvature_seed)
        per_layer[block] = {"parameters": size, "top_eigenvalue": top, "lanczos_steps": steps}
    summary = {
        "hessian_density_mean": moments[1],
        "hessian_density_second_moment": moments[2],
        "hessian_negative_mass": float((weights * (nodes < 0)).sum(1).mean()),
        "hessian_trace_hutchpp": trace,
        "hessian_trace_hutchpp_se": trace_se,
    }
    return summary, {
        "moments": moments,
        "grid": grid.tolist(),
        "density": values.tolist(),
        "nodes": nodes.tolist(),
        "weights": weights.tolist(),
        "parameters": hessian.size,
        "training_points": hessian.samples,
        "per_layer": per_layer,
    }


def _initial_model(network: Network) -> torch.nn.Module:
    start = copy.deepcopy(network.model)
    start.load_state_dict(network.initial())
    return start


def _log_sum(log_prod: float, d: int) -> float:
    # Jiang et al.'s sum of d per-layer terms, replaced by d times their geometric mean
    return math.log(d) + log_prod / d


def output_margin(network: Network) -> tuple[dict[str, float], dict]:
    """γ, the magnitude of the 10th percentile of the training margins (lipdd.measures.baselines),
    and the inverse margin 1/γ²."""
    net, _ = baselines.folded(network.model)
    x, y = network.training_points()
    gamma = baselines.output_margin(net, x, y)
    return {"output_margin": gamma, "inverse_margin": gamma**-2}, {"training_points": len(y)}


def weight_norms(network: Network) -> tuple[dict[str, float], dict]:
    """Jiang et al.'s norm measures of the layers' weights W_l (batch norm folded; l = 1..d):
    their count, their l2 norm, log prod_l ||W_l||^2 with spectral (exact, on the input size each
    layer sees) and Frobenius norms, the same summed (log d + log prod / d), each also over the
    margin (- 2 log γ), the squared distances from initialisation sum_l ||W_l - W_l^0||^2 in both
    norms, and the path norm, also over γ². Per layer in the details."""
    net, layers = baselines.folded(network.model)
    _, start = baselines.folded(_initial_model(network))
    shapes = baselines.input_shapes(net, layers.values(), network.input_shape)
    per_layer = []
    for (name, layer), shape in zip(layers.items(), shapes):
        w, moved = layer.weight, layer.weight - start[name].weight
        per_layer.append(
            {
                "layer": name,
                "input_shape": list(shape),
                "spectral": baselines.operator_norm(layer, w, shape),
                "frobenius": torch.linalg.vector_norm(w).item(),
                "spectral_from_init": baselines.operator_norm(layer, moved, shape),
                "frobenius_from_init": torch.linalg.vector_norm(moved).item(),
            }
        )
    x, y = network.training_points()
    log_margin2, d = 2 * math.log(baselines.output_margin(net, x, y)), len(per_layer)
    summary = {
        "weight_count": sum(layer.weight.numel() for layer in layers.values()),
        "weight_l2_norm": math.sqrt(sum(r["frobenius"] ** 2 for r in per_layer)),
    }
    for norm in ("spectral", "frobenius"):
        log_prod = sum(2 * math.log(r[norm]) for r in per_layer)
        summary[f"log_prod_{norm}"] = log_prod
        summary[f"log_sum_{norm}"] = _log_sum(log_prod, d)
        summary[f"log_prod_{norm}_over_margin"] = log_prod - log_margin2
        summary[f"log_sum_{norm}_over_margin"] = _log_sum(log_prod - log_margin2, d)
        summary[f"{norm}_distance"] = sum(r[f"{norm}_from_init"] ** 2 for r in per_layer)
    summary["path_norm"] = baselines.path_norm(net, network.input_shape)
    summary["path_norm_over_margin"] = summary["path_norm"] / math.exp(log_margin2)
    return summary, {"per_layer": per_layer}


def pacbayes(network: Network) -> tuple[dict[str, float], dict]:
    """Jiang et al.'s PAC-Bayes measures: the perturbation scale σ the training accuracy
    tolerates (lipdd.measures.baselines.pacbayes_sigma, in float32, seeded stats.curvature_seed),
    the flatness 1/σ² and the bounds ||v||² / (4σ²) + log(m/σ) + 10 with v the weights w (orig)
    or w - w0 (init); the same for magnitude-aware σ' with 1/4 sum_i log((ε² + (σ'² + 1) ||v||² /
    ω) / (ε² + σ'² (w_i - w0_i)²)) + log(m/σ') + 10 (ω weights, m training points)."""
    net, layers = baselines.folded(network.model)
    _, start = baselines.folded(_initial_model(network))
    w = torch.cat([layer.weight.flatten() for layer in layers.values()])
    moved = w - torch.cat([start[name].weight.flatten() for name in layers])
    x, y = network.training_points()
    generator = torch.Generator(device=x.device).manual_seed(network.options.curvature_seed)
    m, eps, summary = len(y), baselines.MAGNITUDE_EPS, {}
    # the search is a Monte Carlo estimate to 0.01 of an accuracy: float32 is precise enough, and
    # its forward passes are several times faster than float64's on a CPU
    net = net.float()
    sigma = baselines.pacbayes_sigma(net, x, y, generator)
    summary["pacbayes_sigma"], summary["pacbayes_flatness"] = sigma, sigma**-2
    for kind, v in (("init", moved), ("orig", w)):
        summary[f"pacbayes_{kind}"] = (
            v.square().sum().item() / (4 * sigma**2) + math.log(m / sigma) + 10
        )
    sigma = baselines.pacbayes_sigma(net, x, y, generator, eps)
    summary["pacbayes_mag_sigma"], summary["pacbayes_mag_flatness"] = sigma, sigma**-2
    for kind, v in (("init", moved), ("orig", w)):
        ratio = (eps**2 + (sigma**2 + 1) * v.square().sum() / len(w)) / (
            eps**2 + sigma**2 * moved.square()
        )
        summary[f"pacbayes_mag_{kind}"] = ratio.log().sum().item() / 4 + math.log(m / sigma) + 10
    return summary, {"training_points": m, "weights": len(w)}


MEASURES = {
    m.name: m
    for m in (
        Measure(
            OPNORM,
            "sample",
            jacobian_operator_norm,
            ("normalization",),
            # its largest value over the samples is the empirical lower bound on the Lipschitz
            # constant (the mean is the paper's estimate); p99 says whether one sample makes it
            logged=LOGGED_SUMMARIES + ("max", "p99"),
            # off the training points, the Lipschitz estimate there
            probe_logged=("mean", "max", "clean_mean", "corrupted_mean"),
        ),
        Measure("jacobian", "sample", jacobian_frobenius_norm, ("normalization",)),
        Measure("accuracy", "sample", accuracy, probe_logged=("mean",)),
        Measure("crossentropy", "sample", crossentropy),
        Measure("confidence", "sample", confidence),
        Measure(
            "distance_from_init",
            "network",
            distance_from_init,
            ("initial",),
            ("distance_from_init", "distance_from_init_relative", "parameter_norm"),
        ),
        Measure(
            "lipschitz_upper_bound",
            "network",
            lipschitz_upper_bound,
            (),
            (
                "lipschitz_upper_bound",
                "lipschitz_upper_bound_softmax",
                bound_ratio("none"),
                bound_ratio("softmax"),
            ),
            relate=bound_over_max,
        ),
        Measure(
            "loss_curvature",
            "network",
            loss_curvature,
            ("training_points",),
            ("hessian_top_eigenvalue", "hessian_trace", "hessian_trace_se", "gradient_norm"),
        ),
        Measure(
            "hessian_spectrum",
            "network",
            hessian_spectrum,
            ("training_points",),
            (
                "hessian_density_mean",
                "hessian_density_second_moment",
                "hessian_negative_mass",
                "hessian_trace_hutchpp",
                "hessian_trace_hutchpp_se",
            ),
        ),
        Measure(
            "output_margin",
            "network",
            output_margin,
            ("training_points",),
            ("output_margin", "inverse_margin"),
            baseline=True,
        ),
        Measure(
            "weight_norms",
            "network",
            weight_norms,
            ("initial", "training_points"),
            (
                "weight_count",
                "weight_l2_norm",
                *(
                    f"log_{form}_{norm}{over}"
                    for norm in ("spectral", "frobenius")
                    for over in ("", "_over_margin")
                    for form in ("prod", "sum")
                ),
                "spectral_distance",
                "frobenius_distance",
                "path_norm",
                "path_norm_over_margin",
            ),
            baseline=True,
        ),
        Measure(
            "pacbayes",
            "network",
            pacbayes,
            ("initial", "training_points"),
            tuple(
                f"pacbayes_{mag}{what}"
                for mag in ("", "mag_")
                for what in ("sigma", "flatness", "init", "orig")
            ),
            baseline=True,
        ),
    )
}


def per_sample(
    model,
    x,
    targets,
    selected,
    normalizations,
    target_logit_only=False,
    bigmem=False,
    precision="fp32",
) -> dict[tuple[str, str | None], torch.Tensor]:
    """{(measure, normalization or None): (B,) values} of the selected per-sample measures."""
    for name in selected:
        if name not in MEASURES:
            raise ValueError(f"unknown measure {name!r}, expected one of {tuple(MEASURES)}")
    for n in normalizations:
        if n not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {n!r}, expected one of {NORMALIZATIONS}")
    chosen = [MEASURES[name] for name in selected if MEASURES[name].kind == "sample"]
    if any("normalization" in m.options for m in chosen) and not normalizations:
        raise ValueError(
            f"{', '.join(m.name for m in chosen)}: Jacobian measures need at least one "
            "normalization"
        )
    needed = normalizations if any("normalization" in m.options for m in chosen) else ()
    batch = Batch(model, x, targets, needed, target_logit_only, bigmem, precision)
    out = {}
    for m in chosen:
        for n in normalizations if "normalization" in m.options else (None,):
            out[m.name, n] = m.fn(batch, n) if n is not None else m.fn(batch)
    return out
