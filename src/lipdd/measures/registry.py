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

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..names import LOGGED_SUMMARIES, NORMALIZATIONS, OPNORM, bound_ratio
from . import curvature, jacobian, lipschitz


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
    its standard error, and the gradient norm ||grad L||."""
    s = network.options
    hessian = curvature.Hessian(network.model, *network.training_points())
    eigenvalues, steps = hessian.top_eigenvalues(
        s.curvature_top_k, s.curvature_tolerance, s.curvature_seed, s.curvature_memory << 20
    )
    quadratic = hessian.hutchinson(s.hutchinson_probes, s.curvature_seed)
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
    }


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
