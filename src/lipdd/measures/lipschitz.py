"""An upper bound on a network's Lipschitz constant (l2, w.r.t. its normalised input): the product,
over the linear maps between its ReLUs, of each map's exact spectral norm.

A map is every run of linear layers between two nonlinearities, on the input size it sees:
convolutions with their own stride and padding (no circular approximation), pooling, batch norm in
eval mode, flatten and the final linear layer, composed; biases drop out (they shift, they do not
stretch). ReLU is 1-Lipschitz. A residual block, relu(branch(x) + shortcut(x)), is bounded by
||shortcut|| + ||second map|| * ||first map|| of its branch. Each norm is the square root of the
top eigenvalue of A^T A, found by Lanczos iteration (lipdd.measures.lanczos) on products computed in
float64 by autograd: A v by the forward pass, A^T w by its backward pass.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from .lanczos import top_eigenvalues

TOLERANCE = 1e-10  # relative tolerance on the top eigenvalue of A^T A
# in eval mode, where the bound is taken, dropout is the identity
LINEAR = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Linear,
    nn.Identity,
    nn.Dropout,
)


def spectral_norm(affine, shape: tuple[int, ...], device="cpu") -> float:
    """Largest singular value of the linear part A of `affine` (x -> A x + b) on inputs of
    `shape`."""
    n = math.prod(shape)
    zero = torch.zeros(1, *shape, dtype=torch.float64, device=device)
    with torch.no_grad():
        offset = affine(zero)

    def gram(v: torch.Tensor) -> torch.Tensor:  # A^T A v
        x = v.view(1, *shape).requires_grad_()
        with torch.enable_grad():
            y = affine(x) - offset
            (back,) = torch.autograd.grad(y, x, y.detach())
        return back.flatten()

    (top,), _ = top_eigenvalues(gram, n, tol=TOLERANCE, device=device)
    return math.sqrt(max(top, 0.0))


def _runs(modules: list[nn.Module]) -> list[list[nn.Module]]:
    """The runs of linear layers between the ReLUs of a plain stack."""
    runs = [[]]
    for m in modules:
        if isinstance(m, nn.ReLU):
            runs.append([])
        elif isinstance(m, LINEAR):
            runs[-1].append(m)
        else:
            raise TypeError(f"no Lipschitz bound for layer {type(m).__name__}")
    return [r for r in runs if r]


class _Bound:
    """Walks a network on zero inputs, multiplying the bound and recording each map's norm."""

    def __init__(self, shape, device):
        self.shape, self.device, self.value, self.maps = tuple(shape), device, 1.0, []

    def map(self, name: str, affine) -> float:
        norm = spectral_norm(affine, self.shape, self.device)
        self.maps.append({"map": name, "input_shape": list(self.shape), "norm": norm})
        with torch.no_grad():
            zero = torch.zeros(1, *self.shape, dtype=torch.float64, device=self.device)
            self.shape = tuple(affine(zero).shape[1:])
        return norm

    def chain(self, name: str, modules: list[nn.Module]) -> None:
        for i, run in enumerate(_runs(modules)):
            self.value *= self.map(f"{name}{i}", nn.Sequential(*run))

    def residual(self, name: str, shortcut, first, second) -> None:
        shape = self.shape
        shortcut = 1.0 if shortcut is None else self.map(f"{name}.shortcut", shortcut)
        self.shape = shape
        first, second = self.map(f"{name}.branch0", first), self.map(f"{name}.branch1", second)
        self.value *= shortcut + first * second


def upper_bound(model: nn.Module, input_shape) -> tuple[float, list[dict]]:
    """(bound on the Lipschitz constant of the logits, every map's spectral norm) of a network
    that describes its linear pieces (lipdd.models: `linear_pieces`), on inputs of `input_shape`
    (C, H, W)."""
    if not hasattr(model, "linear_pieces"):
        raise TypeError(f"no Lipschitz bound for {type(model).__name__}")
    net = copy.deepcopy(model).double().eval().requires_grad_(False)
    bound = _Bound(input_shape, next(net.parameters()).device)
    with torch.no_grad():
        for kind, name, *parts in net.linear_pieces():
            getattr(bound, kind)(name, *parts)
    return bound.value, bound.maps
