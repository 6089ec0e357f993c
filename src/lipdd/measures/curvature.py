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

from .lanczos import quadrature, top_eigenvalues

CHUNK = 256  # samples per forward pass


class Hessian:
    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.size = sum(p.numel() for p in self.params)
        # the parameter groups of the per-layer curvature: each module's parameters, in order
        self.blocks = {}
        for name, p in named:
            layer = name.rpartition(".")[0]
            self.blocks[layer] = self.blocks.get(layer, 0) + p.numel()
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

    def rademacher(self, probes: int, seed: int):
        """`probes` Rademacher vectors drawn with `seed`, one at a time, on the model's device (a
        float64 vector of a resnet18_64 is 89 MB: no host copy per probe)."""
        generator = torch.Generator(self.device).manual_seed(seed)
        for _ in range(probes):
            v = torch.randint(0, 2, (self.size,), generator=generator, device=self.device)
            yield v.double().mul_(2).sub_(1)

    def hutchinson(self, probes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(v^T H v, and its share v_b . (H v)_b of each block b of `self.blocks`) for each of the
        Rademacher vectors v of `rademacher(probes, seed)`: each an unbiased estimate of the trace
        (of the block's diagonal block: the cross terms have mean zero)."""
        totals, shares = [], []
        for v in self.rademacher(probes, seed):
            hv = self.matvec(v)
            blocks = (v * hv).split(tuple(self.blocks.values()))
            totals.append(float(v @ hv))
            shares.append(torch.stack([b.sum() for b in blocks]).tolist())
        return np.array(totals), np.array(shares)

    def hutchplusplus(self, products: int, seed: int) -> tuple[float, float]:
        """(the trace by Hutch++ in `products` products, the standard error of its random part)
        (Meyer, Musco, Musco and Woodruff 2021): with k = products // 3 Rademacher vectors each
        for S and G, Q an orthonormal basis of H S, the trace is tr(Q^T H Q), exact on the range
        of Q, plus Hutchinson's estimate with G projected off it, (1/k) sum g'^T H g'. Where H's
        spectrum decays the deflated part has far less variance; the vectors are those of
        `rademacher(2k, seed)`, S first."""
        k = products // 3
        if k < 2:
            raise ValueError(f"Hutch++ needs at least 6 products (two per part), got {products}")
        probes = list(self.rademacher(2 * k, seed))
        q, _ = torch.linalg.qr(torch.stack([self.matvec(v) for v in probes[:k]], 1))
        exact = sum(float(u @ self.matvec(u)) for u in q.T)
        deflated = [g - q @ (q.T @ g) for g in probes[k:]]
        samples = np.array([float(g @ self.matvec(g)) for g in deflated])
        return exact + samples.mean(), float(samples.std(ddof=1) / np.sqrt(k))

    def block_top_eigenvalue(self, block: str, tol: float, seed: int) -> tuple[float, int]:
        """(the largest eigenvalue of the diagonal block of H of one parameter group, the products
        taken)."""
        start = list(self.blocks).index(block)
        offset, size = sum(list(self.blocks.values())[:start]), self.blocks[block]

        def matvec(u: torch.Tensor) -> torch.Tensor:
            v = torch.zeros(self.size, dtype=torch.float64, device=self.device)
            v[offset : offset + size] = u
            return self.matvec(v)[offset : offset + size]

        (top,), steps = top_eigenvalues(matvec, size, 1, tol, device=self.device, seed=seed)
        return top, steps

    def spectrum(self, probes: int, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Stochastic Lanczos quadrature of H's eigenvalue density (Ubaru, Chen and Saad 2017; the
        density PyHessian draws): (nodes, weights), a row per Rademacher vector of
        `rademacher(probes, seed)`, each row the Gauss quadrature of `steps` Lanczos steps from it
        (lanczos.quadrature). The density's estimate puts weight weights / probes at each node:
        its k-th moment estimates tr(H^k) / n, exactly the mean of v^T H^k v / n over the probes
        for k < 2 * steps."""
        rows = [quadrature(self.matvec, v, steps) for v in self.rademacher(probes, seed)]
        width = max(len(nodes) for nodes, _ in rows)  # an invariant Krylov space stops early
        pad = [(0, width - len(nodes)) for nodes, _ in rows]
        nodes = np.stack([np.pad(r[0], p, mode="edge") for r, p in zip(rows, pad)])
        weights = np.stack([np.pad(r[1], p) for r, p in zip(rows, pad)])
        return nodes, weights


def density(nodes: np.ndarray, weights: np.ndarray, points: int, width: float):
    """(grid, values): the quadrature's point masses smoothed by a Gaussian kernel of standard
    deviation `width` times the nodes' range, on `points` grid points spanning the nodes and three
    kernel widths beyond; the values integrate to 1."""
    low, high = nodes.min(), nodes.max()
    sigma = width * max(high - low, 1e-12 * max(abs(low), abs(high), 1.0))
    grid = np.linspace(low - 3 * sigma, high + 3 * sigma, points)
    kernel = np.exp(-0.5 * ((grid[:, None] - nodes.ravel()[None]) / sigma) ** 2)
    values = kernel @ weights.ravel() / (len(nodes) * sigma * np.sqrt(2 * np.pi))
    return grid, values


def moments(nodes: np.ndarray, weights: np.ndarray, count: int) -> list[float]:
    """The density estimate's moments of order 0 .. count - 1."""
    return [float((weights * nodes**k).sum(1).mean()) for k in range(count)]
