"""The Hessian of the mean training loss with respect to the parameters, as products H v.

H v is the gradient of g . v, where g = dL/dtheta is kept with its graph (reverse over reverse).
The gradient's graph is built once, in chunks of samples, and kept for every product: memory is
that of a forward and a backward pass over all the samples (stats.curvature_samples bounds it),
and a product costs one backward pass through it. Vectors are flat float64 tensors on the model's
device, in the order of model.parameters().
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .lanczos import top_eigenvalues

CHUNK = 256  # samples per forward pass


class Hessian:
    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.size = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.samples = len(y)
        self.grads = []  # each chunk's share of the gradient, with its graph
        for i in range(0, self.samples, CHUNK):
            loss = (
                F.cross_entropy(model(x[i : i + CHUNK]), y[i : i + CHUNK], reduction="sum")
                / self.samples
            )
            self.grads.append(
                torch.cat(
                    [g.flatten() for g in torch.autograd.grad(loss, self.params, create_graph=True)]
                )
            )
        self.gradient = sum(g.detach() for g in self.grads).double()
        self.gradient_norm = float(torch.linalg.vector_norm(self.gradient))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v."""
        v = v.to(self.params[0].dtype)
        total = 0
        for g in self.grads:
            total = total + torch.cat(
                [h.flatten() for h in torch.autograd.grad(g @ v, self.params, retain_graph=True)]
            )
        return total.double()

    def top_eigenvalues(
        self, k: int, tol: float, seed: int, memory: int | None = None
    ) -> tuple[list[float], int]:
        """(the k largest eigenvalues, the products taken) by lipdd.measures.lanczos, started from
        the gradient as well as a seeded Gaussian: the gradient lies mostly in the top eigenspace
        (Gur-Ari et al. 2018, "Gradient descent happens in a tiny subspace"), which saves steps.
        `memory`: bytes the Lanczos basis may take."""
        return top_eigenvalues(
            self.matvec,
            self.size,
            k,
            tol,
            device=self.device,
            seed=seed,
            start=self.gradient,
            memory=memory,
        )

    def hutchinson(self, probes: int, seed: int) -> np.ndarray:
        """v^T H v for `probes` Rademacher vectors v drawn with `seed`: each an unbiased estimate of
        the trace. The vectors are drawn on the model's device, one at a time (a float64 vector
        of a resnet18_64 is 89 MB: no host copy per probe)."""
        generator = torch.Generator(self.device).manual_seed(seed)
        samples = []
        for _ in range(probes):
            v = torch.randint(0, 2, (self.size,), generator=generator, device=self.device)
            v = v.double().mul_(2).sub_(1)
            samples.append(float(v @ self.matvec(v)))
        return np.array(samples)
