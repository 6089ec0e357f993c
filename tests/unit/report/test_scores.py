"""The field's scores (lipdd.report.scores) against hand-worked cases and explicit loops over
pairs: Kendall's tau-a, Jiang et al.'s granulated Psi, Dziugaite et al.'s Hoeffding-weighted sign
error, and the bootstrap intervals over each width's runs."""

import itertools
import math

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from lipdd.report import scores
from lipdd.report.tables import Run, correlations, interval, ranking, tables


def run(width, seed, value, error, epochs=None, test_size=None):
    """A Run whose measure "m" and test error are `value` and `error` at the last epoch, and at
    each of `epochs` ({epoch: (value, error)}) before it."""
    epochs = {**(epochs or {}), 10: (value, error)}
    return width, Run(
        f"w{width}s{seed}",
        {"m": value, "test_error": error},
        {"m": {e: v for e, (v, _) in epochs.items()}},
        {e: t for e, (_, t) in epochs.items()},
        str(seed),
        "0.2",
        test_size,
    )


def by_width(*runs):
    grouped = {}
    for width, r in runs:
        grouped.setdefault(width, []).append(r)
    return grouped


def test_kendall_tau_is_tau_a_and_copies_are_ties():
    x, y = np.array([1.0, 2, 3, 4]), np.array([0.3, 0.2, 0.4, 0.1])
    # pairs (1,2) -, (1,3) +, (1,4) -, (2,3) +, (2,4) -, (3,4) -: (2 - 4) / 6
    assert scores.kendall_tau_rows(x[None], y[None])[0] == pytest.approx(-1 / 3)
    assert scores.kendall_tau(x, y, np.ones((1, 4)))[0] == pytest.approx(kendalltau(x, y)[0])
    # {(1, 1), (1, 1), (2, 2)}: the two copies tie, each is concordant with (2, 2): 2 of 3 pairs
    two = np.array([1.0, 2.0])
    assert scores.kendall_tau(two, two, np.array([[2.0, 1.0]]))[0] == pytest.approx(2 / 3)
    # ties in one coordinate count 0 but stay in the denominator (tau-a, not tau-b)
    flat = np.array([[1.0, 1.0, 2.0]])
    assert scores.kendall_tau_rows(flat, np.array([[1.0, 2.0, 3.0]]))[0] == pytest.approx(2 / 3)


def test_spearman_rho_matches_scipy_row_by_row():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    x[0, :3] = 1.0  # ties: average ranks
    got = scores.spearman_rho(x, y)
    assert got == pytest.approx([spearmanr(a, b).statistic for a, b in zip(x, y)], abs=1e-12)


def test_granulated_psi_by_hand():
    runs = by_width(
        run(1, 1, 1.0, 0.1), run(1, 2, 2.0, 0.3), run(2, 1, 3.0, 0.2), run(2, 2, 4.0, 0.25)
    )
    (row,) = correlations(runs, ["m"])
    # varying width at seed 1: (1, .1) (3, .2) +1; at seed 2: (2, .3) (4, .25) -1 -> 0
    # varying seed at width 1: (1, .1) (2, .3) +1; at width 2: (3, .2) (4, .25) +1 -> 1
    assert row["psi_width"] == pytest.approx(0.0) and row["psi_seed"] == pytest.approx(1.0)
    assert row["psi"] == pytest.approx(0.5)
    assert row["spearman_rho"] is None and row["kendall_tau"] is None  # two widths: no ranking
    assert "psi_epoch" not in row  # one epoch: an axis that does not vary is no axis


def test_psi_varies_epoch_within_a_run():
    # One run a width, three epochs: the epoch axis compares a run's checkpoints.
    runs = by_width(
        run(1, 1, 3.0, 0.3, {0: (1.0, 0.9), 5: (2.0, 0.5)}),  # measure up, error down: -1
        run(2, 1, 1.0, 0.1, {0: (3.0, 0.9), 5: (2.0, 0.5)}),  # both down: +1
        run(4, 1, 2.0, 0.2, {0: (2.0, 0.9), 5: (2.0, 0.5)}),  # measure flat: 0
    )
    (row,) = correlations(runs, ["m"])
    assert row["psi_epoch"] == pytest.approx(0.0)
    # across widths at epoch 10: (3, .3) (1, .1) (2, .2): concordant; at 0: error ties; at 5 too
    assert row["psi_width"] == pytest.approx((1 + 0 + 0) / 3)
    assert row["kendall_tau"] == pytest.approx(1.0) and row["spearman_rho"] == pytest.approx(1.0)


def sign_error_by_loops(pairs, n):
    """The environment's weighted sign error by explicit loops: Dziugaite et al.'s definition."""
    total = weighted = squares = 0.0
    for (c1, g1), (c2, g2) in pairs:
        w = max(0.0, 1 - 2 * math.exp(-2 * n * (abs(g1 - g2) / 2) ** 2)) ** 2
        w = max(w - 0.5, 0.0)
        error = (1 - math.copysign(1, c1 - c2) * math.copysign(1, g1 - g2)) / 2
        total, weighted, squares = total + w, weighted + w * error, squares + w * w
    return weighted / total, total**2 / squares


def test_hoeffding_weight_by_hand():
    # n = 100, |d| = 0.2: (1 - 2 e^-2)^2
    assert scores.hoeffding_weight(np.array(0.2), 100) == pytest.approx((1 - 2 * math.exp(-2)) ** 2)
    assert scores.hoeffding_weight(np.array(0.01), 100) == 0.0  # too close to tell apart


def test_sign_error_weighs_pairs_of_seeds_by_hoeffding():
    w1 = [(1.0, 0.10), (2.0, 0.12)]
    w2 = [(3.0, 0.30), (0.5, 0.32)]
    w4 = [(4.0, 0.10), (5.0, 0.11)]  # as good as width 1: no pair survives the weighting
    runs = by_width(
        *(run(1, s, v, e, test_size=100) for s, (v, e) in enumerate(w1)),
        *(run(2, s, v, e, test_size=100) for s, (v, e) in enumerate(w2)),
        *(run(4, s, v, e, test_size=100) for s, (v, e) in enumerate(w4)),
    )
    (row,) = correlations(runs, ["m"])
    envs = [sign_error_by_loops(itertools.product(w1, w2), 100)]
    envs.append(sign_error_by_loops(itertools.product(w2, w4), 100))
    # width 1 against 4: every |d error| <= 0.01, weight 0: no environment
    assert all(ess >= scores.MIN_ESS for _, ess in envs)
    # by hand: |d error| 0.2 (twice) and 0.22 weigh a and b, 0.18 nothing; a 0.2 pair and the 0.22
    # pair disagree in sign
    a, b = ((1 - 2 * math.exp(-2 * 100 * (d / 2) ** 2)) ** 2 - 0.5 for d in (0.2, 0.22))
    assert envs[0][0] == pytest.approx((a + b) / (2 * a + b), abs=1e-12)
    assert row["robust_sign_error"] == pytest.approx(max(e for e, _ in envs), abs=1e-12)
    assert row["sign_error"] == pytest.approx(np.mean([e for e, _ in envs]), abs=1e-12)
    low, high = row["robust_sign_error_low"], row["robust_sign_error_high"]
    assert 0 <= low <= row["robust_sign_error"] <= high <= 1
    # Without the test set's size the weights are unknown: no sign error, nothing made up.
    unsized = {w: [r._replace(test_size=None) for r in g] for w, g in runs.items()}
    (row,) = correlations(unsized, ["m"])
    assert row["robust_sign_error"] is None and row["psi"] is not None


def test_bootstrap_interval_over_the_runs_of_a_width():
    # Width 1 has two runs, (measure 10, error 0.1) and (0, 0.0); the others one each. A bootstrap
    # round sees width 1 as one of them (probability 1/4 each: rho -0.2 and 1) or as their mean
    # (1/2: rho 0.4, the point estimate), so over 1000 rounds the 95% interval is [-0.2, 1].
    runs = by_width(
        run(1, 1, 10, 0.1),
        run(1, 2, 0, 0.0),
        run(2, 1, 2, 0.2),
        run(4, 1, 4, 0.4),
        run(8, 1, 6, 0.6),
    )
    (row,) = correlations(runs, ["m"])
    assert row["spearman_rho"] == pytest.approx(0.4) and row["n_runs"] == 5 and row["n_widths"] == 4
    assert (row["spearman_rho_low"], row["spearman_rho_high"]) == pytest.approx((-0.2, 1.0))
    assert correlations(runs, ["m"]) == [row]  # seeded: the same interval every time
    # Runs that agree leave nothing to resample: the interval is the point.
    runs[1] = [r for _, r in (run(1, 1, 5, 0.05), run(1, 2, 5, 0.05))]
    (row,) = correlations(runs, ["m"])
    assert row["spearman_rho_low"] == row["spearman_rho_high"] == pytest.approx(0.4)


def test_one_run_a_width_has_no_interval():
    runs = by_width(run(1, 1, 1, 0.3), run(2, 1, 2, 0.2), run(4, 1, 3, 0.4), run(8, 1, 4, 0.1))
    (row,) = correlations(runs, ["m"])
    assert row["spearman_rho"] == pytest.approx(1 - 6 * (4 + 0 + 1 + 9) / (4 * 15))
    assert row["spearman_rho_low"] is None and row["kendall_tau_high"] is None


def test_the_mean_over_seeds_has_its_interval():
    # Two runs 0 and 1: a round's mean is 0, 1/2 or 1 (probabilities 1/4, 1/2, 1/4).
    assert interval([0.0, 1.0], np.random.default_rng(0)) == (0.0, 1.0)
    assert interval([0.5, None], np.random.default_rng(0)) == (None, None)
    runs = by_width(run(1, 1, 1.0, 0.2), run(1, 2, 3.0, 0.4), run(2, 1, 2.0, 0.1))
    width_rows, epoch_rows = tables(runs, ["m"])
    assert width_rows[0]["m"] == 2.0 and width_rows[0]["test_error"] == pytest.approx(0.3)
    assert (width_rows[0]["m_low"], width_rows[0]["m_high"]) == (1.0, 3.0)
    assert width_rows[1]["m_low"] is None  # one seed
    assert [(r["width"], r["epoch"], r["m"], r["m_low"]) for r in epoch_rows] == [
        (1, 10, 2.0, 1.0),
        (2, 10, 2.0, None),
    ]


def test_ranking_puts_the_best_psi_first():
    rows = [
        {"measure": "worse", "psi": -0.5, "psi_low": -0.9, "psi_high": 0.1},
        {"measure": "none", "psi": None},
        {"measure": "better", "psi": 0.75, "spearman_rho": 1.0},
    ]
    lines = ranking(rows).splitlines()
    assert [line.split()[0] for line in lines] == ["measure", "better", "worse", "none"]
    assert "-0.50 [-0.90, +0.10]" in lines[2] and "+1.00" in lines[1]
