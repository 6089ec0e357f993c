"""Probe sets: seeded, reproducible inputs built from training points, where `lipdd stats` evaluates
its per-sample measures off the training data: between training points, around them, away from
them, and at the worst input found near them.

A probe is one function in PROBES: build(points, options, model) -> ProbeSet, the points to
measure, each with its provenance (which training points, which coefficient or direction) and the
label it inherits. A probe whose points are neighbourhoods of each training point also says how to
reduce a measure's values there to one value per training point (`reduce`); the summaries are
taken over those. Everything is in normalised input space, where the network and the Jacobians
live. Shifts and interpolations commute with the per-channel normalisation; random inputs are
drawn in pixel space and normalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as datalib
from .registry import per_sample


@dataclass
class Points:
    """The training points probes start from: normalised inputs, the labels trained on, their
    positions in the training split and whether their labels were corrupted."""

    x: torch.Tensor  # (N, C, H, W)
    targets: torch.Tensor  # (N,)
    index: np.ndarray  # (N,) positions in the training split
    corrupted: np.ndarray  # (N,) bool
    mean: list[float]  # per-channel pixel mean and std of the normalisation
    std: list[float]
    num_classes: int


@dataclass
class ProbeSet:
    x: torch.Tensor  # (P, C, H, W) normalised
    targets: torch.Tensor  # (P,) the label each point inherits
    provenance: dict[str, list]  # per point: where it comes from
    # Named subsets of the points (or, with reduce, of the training points) that get a mean of their
    # own.
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    # values at the P points -> {reduction: one value per training point}; the first reduction is
    # the one summarised; None: every point is summarised as it is.
    reduce: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None


def origin_groups(points: Points) -> dict[str, np.ndarray]:
    return {"clean": ~points.corrupted, "corrupted": points.corrupted}


# --- between training points ---------------------------------------------------------------------


def between(points: Points, options, model=None) -> ProbeSet:
    """lambda x_i + (1 - lambda) x_j for every training point i, one partner j drawn among the
    points of its class (the label trained on) and one among the others, with
    numpy.random.default_rng(probe_seed), for each lambda of probe_lambdas. A point inherits the
    label of the endpoint that weighs more (x_i's at lambda = 0.5). Groups: within and across
    classes, and by how many endpoints had corrupted labels (clean: none, corrupted: both)."""
    rng = np.random.default_rng(options.probe_seed)
    labels = points.targets.cpu().numpy()
    n = len(labels)
    i_s, j_s, kinds = [], [], []
    for i in range(n):
        same = np.flatnonzero((labels == labels[i]) & (np.arange(n) != i))
        other = np.flatnonzero(labels != labels[i])
        for kind, candidates in (("within", same), ("across", other)):
            if len(candidates):
                i_s.append(i)
                j_s.append(int(rng.choice(candidates)))
                kinds.append(kind)
    i_s, j_s = np.array(i_s, dtype=np.int64), np.array(j_s, dtype=np.int64)
    lambdas = np.array(options.probe_lambdas, dtype=np.float64)
    pair, lam = np.repeat(np.arange(len(i_s)), len(lambdas)), np.tile(lambdas, len(i_s))
    first, second = torch.as_tensor(i_s[pair]), torch.as_tensor(j_s[pair])
    weight = torch.as_tensor(lam, dtype=points.x.dtype, device=points.x.device).view(-1, 1, 1, 1)
    x = weight * points.x[first] + (1 - weight) * points.x[second]
    targets = torch.where(
        torch.as_tensor(lam >= 0.5, device=points.x.device),
        points.targets[first],
        points.targets[second],
    )
    corrupted = points.corrupted[i_s[pair]].astype(int) + points.corrupted[j_s[pair]]
    kind = np.array(kinds)[pair]
    groups = {
        "clean": corrupted == 0,
        "corrupted": corrupted == 2,
        "mixed": corrupted == 1,
        "within_class": kind == "within",
        "across_classes": kind == "across",
    }
    groups.update({f"lambda{round(v * 100)}": lam == v for v in lambdas})
    provenance = {
        "sample_i": points.index[i_s[pair]].tolist(),
        "sample_j": points.index[j_s[pair]].tolist(),
        "lambda": lam.tolist(),
        "pair": kind.tolist(),
        "corrupted_endpoints": corrupted.tolist(),
    }
    return ProbeSet(x, targets, provenance, groups)


# --- around training points: the double_descent study's neighbourhoods -------------------------


@lru_cache(maxsize=None)
def upstream_shift(height: int, width: int, radius: int, angle: float) -> np.ndarray:
    """The pixel each output pixel of the double_descent study's ShiftTransform reads, for a
    translation by `radius` pixels at `angle`: its very pipeline (torchvision on PIL: edge padding
    by 2 * radius, an affine translation by radius * (cos, sin) with nearest-pixel sampling, a
    centre crop) run once on an image of pixel indices. Sampling the nearest pixel makes the
    transform a pure gather, so this map reproduces it on any image, ties at half pixels included;
    the batch is then gathered on the device."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    indices = Image.fromarray(np.arange(height * width, dtype=np.int32).reshape(height, width))
    padded = TF.pad(indices, padding=2 * radius, padding_mode="edge")
    moved = TF.affine(
        padded,
        angle=0,
        translate=(radius * math.cos(angle), radius * math.sin(angle)),
        scale=1,
        shear=0,
    )
    return np.asarray(TF.center_crop(moved, [height, width]), dtype=np.int64).ravel()


def shifted(x: torch.Tensor, radius: int, angle: float) -> torch.Tensor:
    n, c, h, w = x.shape
    index = torch.as_tensor(upstream_shift(h, w, radius, angle), device=x.device)
    return x.flatten(2)[:, :, index].view(n, c, h, w)


def angles(directions: int) -> np.ndarray:
    """The study's directions: numpy.linspace(0, 2 pi, M, endpoint=False)."""
    return np.linspace(0, 2 * np.pi, directions, endpoint=False)


def shifts(radius: int) -> Callable:
    def probe(points: Points, options, model=None) -> ProbeSet:
        n, m = len(points.targets), options.probe_directions
        x = torch.stack([points.x, *(shifted(points.x, radius, t) for t in angles(m))], 1).flatten(
            0, 1
        )

        def reduce(
            values,
        ):  # the study's Monte Carlo integral: mean over directions of (f(x) + f(x_k)) / 2
            v = values.reshape(n, m + 1)
            return {"": (0.5 * (v[:, :1] + v[:, 1:])).mean(1)}

        provenance = {
            "sample": np.repeat(points.index, m + 1).tolist(),
            "direction": np.tile(np.r_[-1, np.arange(m)], n).tolist(),
            "radius": np.tile(np.r_[0, np.full(m, radius)], n).tolist(),
        }
        return ProbeSet(
            x, points.targets.repeat_interleave(m + 1), provenance, origin_groups(points), reduce
        )

    probe.__doc__ = (
        f"Each training point and its translations by {radius} pixel(s) along probe_directions "
        f"evenly spaced directions (the study's {radius}px-shifts); per training point, the mean "
        "over directions of (f(x) + f(x_k)) / 2, the study's integral."
    )
    return probe


PATH_RADII = (1, 2, 3, 4)  # the study's shifts-path: x -> 1px -> 2px -> 3px -> 4px shift


def shift_paths(points: Points, options, model=None) -> ProbeSet:
    """Along each of probe_directions directions, the path through the training point and its
    translations by 1, 2, 3 and 4 pixels (the study's shifts-path). Per training point: the path
    integral (trapezoidal rule over the path's segments, weighted by their lengths ||x_a+1 - x_a||
    in normalised input space, over the path's length), averaged over directions, as the study's
    integrate_line; and the plain mean over every point of every path ("plain"). A path of length
    0 (a uniform image) integrates to its start's value."""
    n, m, a = len(points.targets), options.probe_directions, len(PATH_RADII) + 1
    paths = [[points.x, *(shifted(points.x, r, t) for r in PATH_RADII)] for t in angles(m)]
    x = torch.stack([torch.stack(p, 1) for p in paths], 1)  # (N, M, A, C, H, W)
    segments = (
        torch.linalg.vector_norm((x[:, :, 1:] - x[:, :, :-1]).flatten(3), dim=-1)
        .double()
        .cpu()
        .numpy()
    )

    def reduce(values):
        f = values.reshape(n, m, a)
        length = segments.sum(-1)
        area = (0.5 * (f[:, :, 1:] + f[:, :, :-1]) * segments).sum(-1)
        integral = np.where(length > 0, area / np.where(length > 0, length, 1), f[:, :, 0])
        return {"": integral.mean(1), "plain": f.reshape(n, -1).mean(1)}

    provenance = {
        "sample": np.repeat(points.index, m * a).tolist(),
        "direction": np.tile(np.repeat(np.arange(m), a), n).tolist(),
        "radius": np.tile(np.r_[0, PATH_RADII], n * m).tolist(),
    }
    return ProbeSet(
        x.flatten(0, 2),
        points.targets.repeat_interleave(m * a),
        provenance,
        origin_groups(points),
        reduce,
    )


# --- away from the data ---------------------------------------------------------------------------


def random_inputs(kind: str) -> Callable:
    def probe(points: Points, options, model=None) -> ProbeSet:
        n, (c, h, w) = len(points.targets), points.x.shape[1:]
        rng = np.random.default_rng(options.probe_seed)
        pixels = datalib.random_pixels(kind, n, (h, w, c), points.mean, points.std, rng)
        mean = torch.tensor(points.mean, dtype=torch.float64).view(1, -1, 1, 1)
        std = torch.tensor(points.std, dtype=torch.float64).view(1, -1, 1, 1)
        x = ((torch.from_numpy(pixels) - mean) / std).to(points.x.device, points.x.dtype)
        targets = torch.from_numpy(rng.integers(0, points.num_classes, n)).to(points.targets.device)
        return ProbeSet(x, targets, {"draw": list(range(n))})

    probe.__doc__ = (
        f"As many random inputs as training points, drawn as upstream's random dataset {kind!r} "
        "draws them (lipdd.data.random_pixels, in pixel space, with "
        "numpy.random.default_rng(probe_seed); not rounded to 8 bits), then normalised; labels "
        "uniform over the classes."
    )
    return probe


# --- the worst input found ------------------------------------------------------------------------

SOFTPLUS_BETA = 10.0  # sharpness of the smooth ReLU the ascent differentiates


class SmoothReLU(torch.overrides.TorchFunctionMode):
    """Inside it, every ReLU is softplus(beta x) / beta. A ReLU network is linear on each of its
    regions, so its input Jacobian, and the Jacobian's norm, is constant there: the norm's gradient
    is zero almost everywhere. The smooth network's gradient says where the norm grows."""

    RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.RELUS:
            return F.softplus(args[0], beta=SOFTPLUS_BETA)
        return func(*args, **(kwargs or {}))


def smooth_operator_norms(model, x: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each sample's logits' input Jacobian through the smooth network,
    differentiable in x."""

    def logits(sample):
        return model(sample.unsqueeze(0)).squeeze(0)

    with SmoothReLU():
        jacobians = torch.func.vmap(torch.func.jacrev(logits))(x)  # (N, K, C, H, W)
        return torch.linalg.matrix_norm(jacobians.flatten(2), ord=2)


def worst(points: Points, options, model) -> ProbeSet:
    """From each training point x0, projected gradient ascent on the operator norm of the logits'
    input Jacobian within the l2 ball of radius worst_radius around x0 (normalised input space):
    worst_steps steps of length 2.5 worst_radius / worst_steps along the normalised gradient of the
    norm through the network with smooth ReLUs (SmoothReLU), each projected back onto the ball. The
    point kept is the iterate with the largest exact norm of the network itself
    (measures.per_sample), x0 unless some iterate is strictly above it: never below the training
    point's own."""
    x0 = points.x.detach()
    radius, steps = options.worst_radius, options.worst_steps
    step = 2.5 * radius / steps
    best, best_norm = (
        x0.clone(),
        torch.full((len(x0),), -math.inf, device=x0.device, dtype=torch.float64),
    )
    x, taken = x0.clone(), torch.zeros(len(x0), dtype=torch.int64, device=x0.device)
    for k in range(steps + 1):
        norms = per_sample(model, x, points.targets, ("jacobian_operator_norm",), ("none",))
        norms = norms["jacobian_operator_norm", "none"].detach().double()
        better = norms > best_norm
        best[better], best_norm[better], taken[better] = x[better], norms[better], k
        if k == steps:
            break
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(smooth_operator_norms(model, x).sum(), x)
        with torch.no_grad():
            direction = grad / torch.linalg.vector_norm(grad.flatten(1), dim=1).clamp_min(
                1e-30
            ).view(-1, 1, 1, 1)
            delta = x + step * direction - x0
            scale = (
                radius / torch.linalg.vector_norm(delta.flatten(1), dim=1).clamp_min(1e-30)
            ).clamp(max=1)
            x = x0 + delta * scale.view(-1, 1, 1, 1)
    distance = torch.linalg.vector_norm((best - x0).flatten(1), dim=1)
    provenance = {
        "sample": points.index.tolist(),
        "step": taken.tolist(),
        "distance": distance.tolist(),
    }
    return ProbeSet(best, points.targets, provenance, origin_groups(points))


PROBES = {
    "between": between,
    "shift1": shifts(1),
    "shift4": shifts(4),
    "shift_path": shift_paths,
    "random_uniform": random_inputs("uniform"),
    "random_normal": random_inputs("normal"),
    "random_ball": random_inputs("hypersphere"),
    "worst": worst,
}
