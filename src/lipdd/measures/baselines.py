"""The generalisation measures lipdd's are compared with: the norm, margin and flatness measures of
Jiang et al. (2019), "Fantastic generalization measures and where to find them", as Dziugaite et
al. (2020) compute them (nitarshan/robust-generalization-measures, read for its definitions).

Every measure is taken on the network with each batch norm folded into the convolution before it
(eval mode), in float64. Its *layers* are its convolutions and linear layers; its *weights* are
their weight tensors, without biases. The margin of a training point is its labelled logit minus
the largest other one. A network's margin γ is the magnitude of the (m // 10)-th smallest margin
of m training points. Below the interpolation threshold that point is misfit, its margin negative,
and γ measures how far it is misfit: upstream takes the magnitude too.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lipschitz import spectral_norm

CHUNK = 256  # training points per forward pass
# PAC-Bayes sigma search, upstream's constants: bisection on [0, SIGMA_MAX], SEARCH_DEPTH halvings,
# stopping once the mean training accuracy of MC_SAMPLES perturbed networks is TARGET_DROP below
# the network's own, to within DROP_TOLERANCE
SIGMA_MAX, SEARCH_DEPTH, MC_SAMPLES, TARGET_DROP, DROP_TOLERANCE = 2.0, 15, 10, 0.1, 0.01
MAGNITUDE_EPS = 1e-3  # the magnitude-aware perturbation's floor


def _modules_in_order(model: nn.Module) -> list[nn.Module]:
    """The linear pieces' modules in the order the input meets them (lipdd.models)."""
    out = []
    for _, _, *parts in model.linear_pieces():
        for part in parts:
            if isinstance(part, nn.Sequential):
                out += list(part)
            elif isinstance(part, list):
                out += part
            elif part is not None:
                out.append(part)
    return out


def folded(model: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """(a float64 eval-mode copy of `model` with every batch norm folded into the convolution it
    follows and replaced by the identity, {name: layer} of the copy in input order). The copy
    computes the same function."""
    if not hasattr(model, "linear_pieces"):
        raise TypeError(f"no layers to measure in {type(model).__name__}")
    net = copy.deepcopy(model).double().eval().requires_grad_(False)
    where = {id(m): name for name, m in net.named_modules()}
    layers, previous = {}, None
    for m in _modules_in_order(net):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            layers[where[id(m)]] = m
        elif isinstance(m, nn.BatchNorm2d):
            if not isinstance(previous, nn.Conv2d):
                raise TypeError(f"batch norm {where[id(m)]} follows no convolution")
            scale = m.weight / (m.running_var + m.eps).sqrt()
            bias = m.bias - scale * m.running_mean
            if previous.bias is not None:
                bias = bias + scale * previous.bias
            previous.weight.mul_(scale.view(-1, 1, 1, 1))
            previous.bias = nn.Parameter(bias, requires_grad=False)
            parent, _, attribute = where[id(m)].rpartition(".")
            setattr(net.get_submodule(parent), attribute, nn.Identity())
        if not isinstance(m, (nn.Identity, nn.Dropout)):
            previous = m
    return net, layers


def input_shapes(net: nn.Module, layers, input_shape) -> list[tuple[int, ...]]:
    """The shape of one input of each of `layers` (batch dimension dropped)."""
    shapes = {}

    def record(layer, args) -> None:  # a pre-hook that returned a value would replace the input
        shapes.setdefault(layer, tuple(args[0].shape[1:]))

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        net(torch.zeros(1, *input_shape, dtype=torch.float64, device=_device(net)))
    finally:
        for h in hooks:
            h.remove()
    return [shapes[layer] for layer in layers]


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def operator_norm(layer: nn.Module, weight: torch.Tensor, shape) -> float:
    """Largest singular value of `layer`'s linear map with weight `weight` on inputs of `shape`:
    exact for a convolution, stride and padding included (lipschitz.spectral_norm)."""
    if isinstance(layer, nn.Linear):
        return torch.linalg.matrix_norm(weight, 2).item()
    return spectral_norm(
        lambda x: F.conv2d(
            x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups
        ),
        shape,
        weight.device,
    )


def logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The network's logits on `x`, in the network's precision."""
    x = x.to(next(net.parameters()).dtype)
    with torch.no_grad():
        return torch.cat([net(x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)])


def margins(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each point's labelled logit minus its largest other logit."""
    out = logits(net, x)
    labelled = out.gather(1, y[:, None]).squeeze(1)
    return labelled - out.scatter(1, y[:, None], -math.inf).amax(1)


def output_margin(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """γ: the magnitude of the (m // 10)-th smallest of m margins (at least the smallest)."""
    return abs(margins(net, x, y).kthvalue(max(len(y) // 10, 1)).values.item())


def path_norm(net: nn.Module, input_shape) -> float:
    """The sum of the outputs, on an input of ones, of the network with every parameter squared:
    the sum over input-output paths of the squared weights (and biases) along them."""
    squared = copy.deepcopy(net)
    with torch.no_grad():
        for p in squared.parameters():
            p.square_()
        ones = torch.ones(1, *input_shape, dtype=torch.float64, device=_device(net))
        return squared(ones).sum().item()


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (logits(net, x).argmax(1) == y).double().mean().item()


def bisect_sigma(drop_at) -> float:
    """Upstream's bisection for the perturbation scale: the first midpoint of [0, SIGMA_MAX] whose
    accuracy drop drop_at(sigma) is TARGET_DROP ± DROP_TOLERANCE, else the last of SEARCH_DEPTH."""
    lower, upper = 0.0, SIGMA_MAX
    for _ in range(SEARCH_DEPTH):
        sigma = (lower + upper) / 2
        drop = drop_at(sigma)
        if abs(drop - TARGET_DROP) < DROP_TOLERANCE:
            break
        lower, upper = (lower, sigma) if drop > TARGET_DROP else (sigma, upper)
    return sigma


def pacbayes_sigma(net, x, y, generator: torch.Generator, magnitude_eps: float | None = None):
    """The largest perturbation scale σ the network's training accuracy tolerates (bisect_sigma),
    each accuracy the mean over MC_SAMPLES networks w + u: u ~ N(0, σ² I), or, magnitude-aware,
    u_i ~ N(0, σ² w_i² + ε²) (Jiang et al.'s variances; upstream passes them as standard
    deviations). Every parameter is perturbed, biases included, in the network's precision;
    `net` is left as it was."""
    params = list(net.parameters())
    original = [p.detach().clone() for p in params]
    base = accuracy(net, x, y)

    def drop_at(sigma: float) -> float:
        accuracies = []
        for _ in range(MC_SAMPLES):
            with torch.no_grad():
                for p, w in zip(params, original):
                    noise = torch.randn(
                        w.shape, generator=generator, dtype=w.dtype, device=w.device
                    )
                    if magnitude_eps is None:
                        std = sigma
                    else:
                        std = (sigma**2 * w.square() + magnitude_eps**2).sqrt()
                    p.copy_(w + std * noise)
            accuracies.append(accuracy(net, x, y))
        return abs(sum(accuracies) / len(accuracies) - base)

    try:
        return bisect_sigma(drop_at)
    finally:
        with torch.no_grad():
            for p, w in zip(params, original):
                p.copy_(w)
