"""lipdd.measures.lanczos against the eigenvalues of explicit symmetric matrices (float64)."""

import numpy as np
import pytest
import torch

from lipdd.measures.lanczos import quadrature, top_eigenvalues


def symmetric(spectrum, seed=0):
    """Q diag(spectrum) Q^T with a random orthogonal Q."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(spectrum), len(spectrum))))
    return torch.from_numpy(q @ np.diag(spectrum) @ q.T)


def products(a):
    count = [0]

    def matvec(v):
        count[0] += 1
        return a @ v

    return matvec, count


@pytest.mark.parametrize("tol", [1e-3, 1e-10])
@pytest.mark.parametrize("k", [1, 3])
def test_largest_eigenvalues_to_the_tolerance(tol, k):
    # The largest algebraically, not in magnitude (-8 is the largest in magnitude); a close pair on
    # top.
    spectrum = np.concatenate(
        [[2.0, 1.999, 1.5, -8.0], np.random.default_rng(1).uniform(-1, 1, 396)]
    )
    a = symmetric(spectrum)
    matvec, count = products(a)
    values, steps = top_eigenvalues(matvec, 400, k=k, tol=tol)
    exact = np.sort(spectrum)[::-1][:k]
    assert len(values) == k and values == sorted(values, reverse=True)
    assert np.all(np.abs(np.array(values) - exact) <= tol * np.abs(exact))
    assert np.all(np.array(values) <= exact + 1e-12)  # Ritz values approach from below
    assert steps == count[0] < 400


def test_invariant_krylov_space_gives_exact_values_early():
    spectrum = np.repeat(
        [3.0, 1.0, -2.0], 50
    )  # three distinct eigenvalues: a Krylov space of dimension 3
    matvec, count = products(symmetric(spectrum))
    values, steps = top_eigenvalues(matvec, 150, k=2, tol=1e-14)
    assert steps == 3 and values == pytest.approx([3.0, 1.0], abs=1e-12)


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_operators(n):
    a = symmetric([0.5, 4.0][:n])
    values, steps = top_eigenvalues(products(a)[0], n, k=2, tol=1e-12)
    assert values == pytest.approx(sorted([0.5, 4.0][:n], reverse=True), abs=1e-13) and steps <= n


def test_start_vector_is_seeded():
    a = symmetric(np.linspace(0, 1, 300))
    assert top_eigenvalues(products(a)[0], 300, seed=5) == top_eigenvalues(
        products(a)[0], 300, seed=5
    )
    assert top_eigenvalues(products(a)[0], 300, seed=5) != top_eigenvalues(
        products(a)[0], 300, seed=6
    )


def test_no_convergence_is_an_error():
    a = symmetric(np.linspace(0, 1, 300))
    with pytest.raises(
        RuntimeError, match="Lanczos did not reach relative tolerance 1e-12 in 5 steps"
    ):
        top_eigenvalues(products(a)[0], 300, tol=1e-12, max_steps=5)


def test_a_start_near_the_top_eigenvector_saves_steps_and_a_bad_one_costs_no_accuracy():
    spectrum = np.concatenate([[1.0], np.linspace(-0.9, 0.9, 499)])
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((500, 500)))
    a = torch.from_numpy(q @ np.diag(spectrum) @ q.T)
    top = torch.from_numpy(q[:, 0])
    plain, plain_steps = top_eigenvalues(products(a)[0], 500, tol=1e-8)
    guessed, guessed_steps = top_eigenvalues(
        products(a)[0], 500, tol=1e-8, start=top + 0.1 * torch.from_numpy(q[:, 1])
    )
    assert guessed_steps < plain_steps
    # A start orthogonal to the top eigenvector (here: the next one) is still met by the Gaussian
    # half.
    misled, _ = top_eigenvalues(products(a)[0], 500, tol=1e-8, start=torch.from_numpy(q[:, 1]))
    ignored = top_eigenvalues(products(a)[0], 500, tol=1e-8, start=torch.zeros(500))
    for values in (plain, guessed, misled):
        assert values[0] == pytest.approx(1.0, rel=1e-8)
    assert ignored == (plain, plain_steps)


@pytest.mark.parametrize("k", [1, 2])
def test_a_memory_budget_restarts_and_keeps_the_tolerance(k):
    spectrum = np.concatenate([[3.0, 2.9, 2.0], np.random.default_rng(2).uniform(-1, 1.5, 297)])
    a = symmetric(spectrum)
    exact = np.sort(spectrum)[::-1][:k]
    unbounded, unbounded_steps = top_eigenvalues(products(a)[0], 300, k=k, tol=1e-8)
    matvec, count = products(a)
    rows = 10  # the basis may hold 10 vectors of 300 float64 values
    bounded, steps = top_eigenvalues(matvec, 300, k=k, tol=1e-8, memory=rows * 300 * 8)
    assert unbounded_steps > rows  # so the bounded run had to restart
    assert steps == count[0] > unbounded_steps  # restarts cost products ...
    for values in (unbounded, bounded):  # ... not accuracy
        assert np.all(np.abs(np.array(values) - exact) <= 1e-8 * exact)
    with pytest.raises(RuntimeError, match="did not reach relative tolerance 1e-08 in 15 steps"):
        top_eigenvalues(products(a)[0], 300, k=k, tol=1e-8, memory=rows * 300 * 8, max_steps=15)


def test_quadrature_is_exact_below_twice_its_steps():
    """u^T A^k u = sum_j w_j theta_j^k for k < 2 x steps, and not beyond in general."""
    spectrum = np.linspace(-2.0, 5.0, 60) ** 3
    a = symmetric(spectrum)
    u = torch.from_numpy(np.random.default_rng(1).standard_normal(60))
    matvec, count = products(a)
    nodes, weights = quadrature(matvec, u, 5)
    assert count[0] == 5 and len(nodes) == 5
    unit = u / u.norm()
    for k in range(10):
        want = (unit @ torch.linalg.matrix_power(a, k) @ unit).item()
        assert (weights * nodes**k).sum() == pytest.approx(want, rel=1e-10), k
    want = (unit @ torch.linalg.matrix_power(a, 10) @ unit).item()
    assert (weights * nodes**10).sum() != pytest.approx(want, rel=1e-8)


def test_quadrature_of_an_invariant_space_is_exact_for_every_function():
    """Three distinct eigenvalues: the Krylov space is invariant after three steps, and the
    quadrature is the spectral measure itself."""
    a = symmetric(np.repeat([-1.0, 0.5, 3.0], 10))
    u = torch.ones(30, dtype=torch.float64)
    matvec, count = products(a)
    nodes, weights = quadrature(matvec, u, 20)
    assert count[0] == 3 and nodes == pytest.approx([-1.0, 0.5, 3.0], abs=1e-10)
    unit = u / u.norm()
    eigenvalues, q = torch.linalg.eigh(a)
    want = ((q.T @ unit) ** 2 * torch.exp(eigenvalues)).sum().item()
    assert (weights * np.exp(nodes)).sum() == pytest.approx(want, rel=1e-10)
