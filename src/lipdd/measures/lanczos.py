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
Memory: every Lanczos vector is kept (steps x n float64 values), the price of reorthogonalising
against all of them, which keeps the iteration free of spurious copies of converged eigenvalues.
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
) -> tuple[list[float], int]:
    """(the k largest eigenvalues, largest first; the number of products taken) of the symmetric
    n x n operator `matvec`, which takes and returns float64 vectors on `device`. The start vector
    is Gaussian, drawn on the CPU from `seed`, so the result is reproducible; a `start` guessed near
    the wanted eigenvectors is added to it with equal weight: it saves steps when the guess is good
    and, with the Gaussian half, still reaches every eigenvector when it is not."""
    k = min(k, n)
    q = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        device
    )
    q /= torch.linalg.vector_norm(q)
    if start is not None and float(torch.linalg.vector_norm(start)) > 0:
        q += start.to(device, torch.float64) / torch.linalg.vector_norm(start)
    basis = torch.empty(
        min(n, max_steps, 16), n, dtype=torch.float64, device=device
    )  # grows by doubling
    basis[0] = q / torch.linalg.vector_norm(q)
    alphas, betas = [], []
    for step in range(1, min(n, max_steps) + 1):
        q = basis[step - 1]
        w = matvec(q)
        alpha = w @ q
        w -= alpha * q
        if betas:
            w -= betas[-1] * basis[step - 2]
        # The three-term recurrence leaves components along older vectors that grow as Ritz vectors
        # converge; one pass against all of them removes them, unless it cancelled most of w (then a
        # second pass removes the first's rounding: "twice is enough"). Scalars stay on the device
        # until one read per pass: on a GPU each read is a synchronisation.
        before, correction = torch.linalg.vector_norm(w), 0.0
        for _ in range(2):
            coefficients = basis[:step] @ w
            w -= basis[:step].T @ coefficients
            norm = torch.linalg.vector_norm(w)
            alpha_value, along_q, before_value, beta = torch.stack(
                [alpha, coefficients[-1], before, norm]
            ).tolist()
            correction += along_q
            if beta > 0.5 * before_value:
                break
            before = norm
        alphas.append(alpha_value + correction)
        ritz, vectors = eigh_tridiagonal(
            np.array(alphas),
            np.array(betas),
            select="i",
            select_range=(step - min(k, step), step - 1),
            check_finite=False,
        )
        ritz, residuals = ritz[::-1], beta * np.abs(vectors[-1, ::-1])  # largest first
        if (
            beta <= 1e-12 * np.abs(ritz).max()
            or step == n
            or np.all(residuals <= tol * np.abs(ritz))
        ):
            return ritz.tolist(), step
        betas.append(beta)
        if step == len(basis):
            basis = torch.cat([basis, torch.empty_like(basis)])
        basis[step] = w / beta
    raise RuntimeError(
        f"Lanczos did not reach relative tolerance {tol:g} in {max_steps} steps "
        f"(largest Ritz values {ritz.tolist()})"
    )
