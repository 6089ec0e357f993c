"""The largest eigenvalues of a symmetric operator given only as products v -> A v: Lanczos
iteration with full reorthogonalisation, on the operator's own device.

It stops after the first product at which every wanted Ritz value theta has residual
||A x - theta x|| <= tol |theta|, which guarantees an eigenvalue of A within tol |theta| of it
(for a symmetric A), or when the Krylov space is invariant (its Ritz values are then exact).
Ritz values never exceed the eigenvalues they approximate, so an early stop can only underestimate.
Why not scipy's eigsh (ARPACK), with the same test: it checks it once per restart cycle (ncv
products, 20 by default), and every product is a round trip through numpy on the host, which on
a GPU is a device-to-host copy of the vector each time.

Each step costs one product, one reorthogonalisation pass against the kept vectors (rarely two)
and the top of the tridiagonal's spectrum (LAPACK's bisection and inverse iteration, linear in the
steps, where a full eigendecomposition every step grew to cost more than the product on small
operators).
Memory: every Lanczos vector of a cycle is kept (steps x n float64 values), the price of
reorthogonalising against all of them, which keeps the iteration free of spurious copies of
converged eigenvalues. They are kept in blocks allocated as the basis grows, so it never copies
itself. `memory` bounds them: a cycle that fills it restarts from the sum of its top-k Ritz
vectors (explicit restart): memory stays bounded, at the price of more products (a restart
discards the Krylov space but its best vectors).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal


def top_eigenvalues(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    k: int = 1,
    tol: float = 1e-3,
    max_steps: int = 1000,
    device="cpu",
    seed: int = 0,
    start: torch.Tensor | None = None,
    memory: int | None = None,
) -> tuple[list[float], int]:
    """(the k largest eigenvalues, largest first; the number of products taken) of the symmetric
    n x n operator `matvec`, which takes and returns float64 vectors on `device`. The start vector
    is Gaussian, drawn on the CPU from `seed`, so the result is reproducible; a `start` guessed near
    the wanted eigenvectors is added to it with equal weight: it saves steps when the guess is good
    and, with the Gaussian half, still reaches every eigenvector when it is not. `memory`: bytes
    the basis may take (None: as many as max_steps); at least k + 2 vectors are kept."""
    k = min(k, n)
    rows = min(n, max_steps)
    if memory is not None:
        rows = min(rows, max(k + 2, memory // (8 * n)))
    q = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        device
    )
    q /= torch.linalg.vector_norm(q)
    if start is not None and float(torch.linalg.vector_norm(start)) > 0:
        q += start.to(device, torch.float64) / torch.linalg.vector_norm(start)
    basis = Basis(rows, n, device)
    taken = 0
    while True:
        basis[0] = q / torch.linalg.vector_norm(q)
        ritz, coefficients, steps, converged = cycle(matvec, basis, n, k, tol, max_steps - taken)
        taken += steps
        if converged:
            return ritz.tolist(), taken
        if taken >= max_steps:
            raise RuntimeError(
                f"Lanczos did not reach relative tolerance {tol:g} in {max_steps} steps "
                f"(largest Ritz values {ritz.tolist()})"
            )
        q = basis.combine(torch.from_numpy(coefficients.sum(1)).to(device))


class Basis:
    """Up to `rows` float64 vectors of length n, in blocks of about BLOCK_BYTES allocated when
    first written: a growing basis is never copied, its memory is that of the rows written
    rounded up to a block, and a small operator's basis is one block (one product per pass)."""

    BLOCK_BYTES = 64 << 20

    def __init__(self, rows: int, n: int, device):
        self.rows, self.n, self.device, self.blocks = rows, n, device, []
        self.block = max(1, min(rows, self.BLOCK_BYTES // (8 * n)))

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i // self.block][i % self.block]

    def __setitem__(self, i: int, v: torch.Tensor) -> None:
        if i // self.block == len(self.blocks):
            size = min(self.block, self.rows - i)
            self.blocks.append(torch.empty(size, self.n, dtype=torch.float64, device=self.device))
        self.blocks[i // self.block][i % self.block] = v

    def parts(self, count: int):
        """The first `count` rows, as views of whole or partial blocks."""
        for start in range(0, count, self.block):
            yield self.blocks[start // self.block][: count - start]

    def dot(self, w: torch.Tensor, count: int) -> torch.Tensor:
        """basis[:count] @ w"""
        if count <= self.block:
            return self.blocks[0][:count] @ w
        return torch.cat([part @ w for part in self.parts(count)])

    def combine(self, c: torch.Tensor) -> torch.Tensor:
        """basis[:len(c)].T @ c"""
        if len(c) <= self.block:
            return self.blocks[0][: len(c)].T @ c
        total, start = 0, 0
        for part in self.parts(len(c)):
            total = total + part.T @ c[start : start + len(part)]
            start += len(part)
        return total


def step(matvec, basis: Basis, i: int, betas: list[float]) -> tuple[float, float, torch.Tensor]:
    """Lanczos step i (from 1) on basis[:i]: (alpha_i, beta_i, the next vector times beta_i)."""
    q = basis[i - 1]
    w = matvec(q)
    alpha = w @ q
    w -= alpha * q
    if betas:
        w -= betas[-1] * basis[i - 2]
    # The three-term recurrence leaves components along older vectors that grow as Ritz vectors
    # converge; one pass against all of them removes them, unless it cancelled most of w (then a
    # second pass removes the first's rounding: "twice is enough"). Scalars stay on the device
    # until one read per pass: on a GPU each read is a synchronisation.
    before, correction = torch.linalg.vector_norm(w), 0.0
    for _ in range(2):
        coefficients = basis.dot(w, i)
        w -= basis.combine(coefficients)
        norm = torch.linalg.vector_norm(w)
        alpha_value, along_q, before_value, beta = torch.stack(
            [alpha, coefficients[-1], before, norm]
        ).tolist()
        correction += along_q
        if beta > 0.5 * before_value:
            break
        before = norm
    return alpha_value + correction, beta, w


def cycle(matvec, basis: Basis, n: int, k: int, tol: float, limit: int) -> tuple:
    """One Lanczos cycle from basis[0], for at most len(basis) and `limit` products: (the top Ritz
    values, largest first; their vectors' coefficients in the basis, a column each; the products
    taken; whether they converged)."""
    alphas, betas = [], []
    for i in range(1, min(len(basis), limit) + 1):
        alpha, beta, w = step(matvec, basis, i, betas)
        alphas.append(alpha)
        ritz, vectors = eigh_tridiagonal(
            np.array(alphas),
            np.array(betas),
            select="i",
            select_range=(i - min(k, i), i - 1),
            check_finite=False,
        )
        ritz, vectors = ritz[::-1], vectors[:, ::-1]  # largest first
        residuals = beta * np.abs(vectors[-1])
        invariant = beta <= 1e-12 * np.abs(ritz).max() or i == n
        if invariant or np.all(residuals <= tol * np.abs(ritz)):
            return ritz, vectors, i, True
        if i == len(basis):
            break
        betas.append(beta)
        basis[i] = w / beta
    return ritz, vectors, i, False


def quadrature(matvec, start: torch.Tensor, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature of the spectral measure of the symmetric operator `matvec` seen from the
    unit vector along `start` (Golub and Meurant): (nodes, weights) such that sum_j weights_j *
    f(nodes_j) = u^T f(A) u, u = start / ||start||, exactly for polynomials f of degree below
    2 * steps. The nodes are the Ritz values of `steps` Lanczos steps from u (fewer when the Krylov
    space is invariant earlier, and then exact for every f), the weights the squared first
    components of their eigenvectors."""
    n = len(start)
    basis = Basis(min(steps, n), n, start.device)
    basis[0] = start / torch.linalg.vector_norm(start)
    alphas, betas = [], []
    for i in range(1, len(basis) + 1):
        alpha, beta, w = step(matvec, basis, i, betas)
        alphas.append(alpha)
        if i == len(basis) or beta <= 1e-12 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        basis[i] = w / beta
    nodes, vectors = eigh_tridiagonal(np.array(alphas), np.array(betas), check_finite=False)
    return nodes, vectors[0] ** 2
