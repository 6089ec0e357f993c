"""The largest eigenvalues of a symmetric operator given only as products v -> A v: Lanczos
iteration with full reorthogonalisation, on the operator's own device.

It stops after the first product at which every wanted Ritz value theta has residual
||A x - theta x|| <= tol |theta|, which guarantees an eigenvalue of A within tol |theta| of it
(for a symmetric A), or when the Krylov space is invariant (its Ritz values are then exact).
Ritz values never exceed the eigenvalues they approximate, so an early stop can only underestimate.
Why not scipy's eigsh (ARPACK), with the same test: it checks it once per restart cycle (ncv
products, 20 by default), and every product is a round trip through numpy on the host, which on
a GPU is a device-to-host copy of the vector each time.

Memory: every Lanczos vector is kept (steps x n float64 values), the price of reorthogonalising
against all of them, which keeps the iteration free of spurious copies of converged eigenvalues.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def top_eigenvalues(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, k: int = 1, tol: float = 1e-3,
                    max_steps: int = 1000, device="cpu", seed: int = 0) -> tuple[list[float], int]:
    """(the k largest eigenvalues, largest first; the number of products taken) of the symmetric
    n x n operator `matvec`, which takes and returns float64 vectors on `device`. The start vector
    is Gaussian, drawn on the CPU from `seed`, so the result is reproducible."""
    k = min(k, n)
    q = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    basis = torch.empty(min(n, max_steps, 16), n, dtype=torch.float64, device=device)  # grows by doubling
    basis[0] = q / torch.linalg.vector_norm(q)
    alphas, betas = [], []
    for step in range(1, min(n, max_steps) + 1):
        w = matvec(basis[step - 1])
        alphas.append(float(w @ basis[step - 1]))
        for _ in range(2):  # one Gram-Schmidt pass leaves rounding-sized components; a second removes them
            w -= basis[:step].T @ (basis[:step] @ w)
        beta = float(torch.linalg.vector_norm(w))
        # The tridiagonal's eigenproblem by torch: numpy's threaded BLAS, called between torch's
        # operations, keeps cores spinning that torch's own threads then wait for.
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        ritz, vectors = (t.flip(-1).numpy() for t in torch.linalg.eigh(tridiagonal))  # largest first
        wanted, residuals = ritz[:k], beta * np.abs(vectors[-1, :k])
        if beta <= 1e-12 * np.abs(ritz).max() or step == n or np.all(residuals <= tol * np.abs(wanted)):
            return wanted.tolist(), step
        betas.append(beta)
        if step == len(basis):
            basis = torch.cat([basis, torch.empty_like(basis)])
        basis[step] = w / beta
    raise RuntimeError(f"Lanczos did not reach relative tolerance {tol:g} in {max_steps} steps "
                       f"(largest Ritz values {wanted.tolist()})")
