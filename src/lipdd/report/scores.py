"""How well a measure ranks networks by test error, scored as the generalisation-measure literature
scores it, each score with a 95% bootstrap interval over runs.

A *model* is one checkpoint of one run: its hyperparameters (width, seed, epoch, label noise), the
measure's value and its test error there. Scores:

- Spearman's rho and Kendall's tau across widths, on each width's mean over its runs;
- Jiang et al. (2019)'s granulated Kendall Psi: for each axis (hyperparameter), the mean over the
  settings of the other axes of tau among the models that differ in that axis only; Psi is the mean
  over the axes that vary;
- Dziugaite et al. (2020)'s sign error: an environment is a pair of hyperparameter settings that
  differ in one of them (seeds are repeats, not settings); its sign error is the mean over the
  pairs of runs across the two settings of (1 - sgn(d measure) sgn(d test error)) / 2, each pair
  weighted by (w - 1/2)+ where w = (1 - 2 exp(-n (d test error)^2 / 2))+^2 is Hoeffding's
  confidence that two test errors measured on n samples differ; the robust sign error is the worst
  environment's, over environments whose weights have an effective sample size of at least
  MIN_ESS.

The bootstrap resamples each width's runs with replacement (every checkpoint of a run goes with
it) and computes every score on the resampled runs: duplicates count as the repeats they are.
Kendall's tau is tau-a, as Jiang et al. define it: ties count 0 among all pairs."""

from __future__ import annotations

import itertools
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

ROUNDS = 1000
MIN_ESS = 1.0  # upstream's 12 assumes hundreds of repeats; a digits sweep has a few seeds
SCORES = ("spearman_rho", "kendall_tau", "psi", "sign_error", "robust_sign_error")


@dataclass
class Models:
    """The models one measure is scored on: value, test error, run (index into the runs) and
    hyperparameters of each; each run's width and final value and test error."""

    value: np.ndarray
    error: np.ndarray
    run: np.ndarray
    hparams: list[dict]
    run_width: list[int]
    run_value: np.ndarray
    run_error: np.ndarray


def kendall_tau(x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Kendall's tau-a of the points (x, y) (n,) under each row of `counts` (rounds, n): how many
    copies of each point that round holds (copies of one point are ties)."""
    concordance = np.sign(x[:, None] - x[None]) * np.sign(y[:, None] - y[None])
    n = counts.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("ri,ij,rj->r", counts, concordance, counts) / (n * (n - 1))


def kendall_tau_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-a of each row of x and y (rounds, n)."""
    n = x.shape[1]
    concordance = np.sign(x[:, :, None] - x[:, None]) * np.sign(y[:, :, None] - y[:, None])
    return concordance.sum((1, 2)) / (n * (n - 1))


def spearman_rho(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of x and y (rounds, n): Pearson's r of their average ranks."""
    rx, ry = (rankdata(a, axis=1) for a in (x, y))
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(1) / np.sqrt((rx**2).sum(1) * (ry**2).sum(1))


def hoeffding_weight(delta: np.ndarray, n: int) -> np.ndarray:
    """Dziugaite et al.'s confidence that two error rates measured on n samples each, |delta|
    apart, differ: (1 - 2 exp(-2 n (delta / 2)^2))+ squared."""
    return np.maximum(0.0, 1.0 - 2.0 * np.exp(-2.0 * n * (np.abs(delta) / 2) ** 2)) ** 2


def width_means(models: Models, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rounds, widths) means of the final value and of the final test error of each width's
    runs, each run counted as often as `counts` (rounds, runs) says."""
    widths = sorted(set(models.run_width))
    values, errors = np.zeros((len(counts), len(widths))), np.zeros((len(counts), len(widths)))
    for j, width in enumerate(widths):
        runs = [r for r, w in enumerate(models.run_width) if w == width]
        c = counts[:, runs]
        values[:, j] = (c * models.run_value[runs]).sum(1) / c.sum(1)
        errors[:, j] = (c * models.run_error[runs]).sum(1) / c.sum(1)
    return values, errors


def psi(models: Models, counts: np.ndarray, axes: list[str]) -> dict[str, np.ndarray]:
    """Granulated Kendall Psi (rounds,) over the axes that vary among the models, as "psi", and
    each axis's mean tau as "psi_<axis>"."""
    per_axis = {}
    for axis in axes:
        groups = defaultdict(list)
        for i, h in enumerate(models.hparams):
            groups[tuple(sorted((k, v) for k, v in h.items() if k != axis))].append(i)
        groups = [g for g in groups.values() if len({models.hparams[i][axis] for i in g}) > 1]
        if groups:
            taus = [kendall_tau(models.value[g], models.error[g], counts[:, models.run[g]])
                    for g in groups]  # fmt: skip
            per_axis[f"psi_{axis}"] = nanmean(np.stack(taus))
    everything = nanmean(np.stack(list(per_axis.values()))) if per_axis else None
    return {"psi": np.full(len(counts), np.nan) if everything is None else everything, **per_axis}


def sign_errors(models: Models, counts: np.ndarray, test_size: int, axes: list[str]) -> np.ndarray:
    """(rounds, environments) sign error of each environment whose effective sample size reaches
    MIN_ESS in that round (nan otherwise)."""
    settings = defaultdict(list)  # every hyperparameter but the seed: the seeds are repeats
    for i, h in enumerate(models.hparams):
        settings[tuple(h[a] for a in axes)].append(i)
    losses = []
    for (s1, a), (s2, b) in itertools.combinations(settings.items(), 2):
        if sum(x != y for x, y in zip(s1, s2)) != 1:
            continue
        d_value = models.value[a][:, None] - models.value[b][None]
        d_error = models.error[a][:, None] - models.error[b][None]
        weight = np.maximum(hoeffding_weight(d_error, test_size) - 0.5, 0.0)
        error = (1 - np.sign(d_value) * np.sign(d_error)) / 2
        ca, cb = counts[:, models.run[a]], counts[:, models.run[b]]
        total = np.einsum("ra,ab,rb->r", ca, weight, cb)
        squares = np.einsum("ra,ab,rb->r", ca, weight**2, cb)
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = np.einsum("ra,ab,rb->r", ca, weight * error, cb) / total
            ess = total**2 / squares
        losses.append(np.where((total > 0) & (ess >= MIN_ESS), loss, np.nan))
    return np.stack(losses, 1) if losses else np.full((len(counts), 0), np.nan)


def nanmean(a: np.ndarray, axis: int = 0) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan slices are nan, as they should
        return np.nanmean(a, axis=axis)


def nanmax(a: np.ndarray, axis: int = 1) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(a, axis=axis) if a.shape[axis] else np.full(len(a), np.nan)


def all_scores(models: Models, counts: np.ndarray, test_size: int | None) -> dict[str, np.ndarray]:
    """Every score (rounds,) under each round's run counts."""
    values, errors = width_means(models, counts)
    enough = values.shape[1] >= 3  # a rank correlation of two points says nothing
    nan = np.full(len(counts), np.nan)
    axes = [a for a in models.hparams[0] if len({h[a] for h in models.hparams}) > 1]
    settings = [a for a in axes if a != "seed"]
    envs = sign_errors(models, counts, test_size, settings) if test_size and settings else None
    return {
        "spearman_rho": spearman_rho(values, errors) if enough else nan,
        "kendall_tau": kendall_tau_rows(values, errors) if enough else nan,
        **psi(models, counts, axes),
        "sign_error": nanmean(envs, axis=1) if envs is not None and envs.shape[1] else nan,
        "robust_sign_error": nanmax(envs) if envs is not None else nan,
    }


def score(models: Models, test_size: int | None, rounds: int = ROUNDS, seed: int = 0) -> dict:
    """Every score of one measure and, where some width has several runs, its 95% bootstrap
    interval (`<score>_low`, `<score>_high`)."""
    n_runs = len(models.run_width)
    point = all_scores(models, np.ones((1, n_runs)), test_size)
    row = {}
    by_width = defaultdict(list)
    for r, width in enumerate(models.run_width):
        by_width[width].append(r)
    boot = None
    if any(len(runs) > 1 for runs in by_width.values()):
        rng = np.random.default_rng(seed)
        counts = np.zeros((rounds, n_runs))
        for runs in by_width.values():
            draws = rng.integers(0, len(runs), (rounds, len(runs)))
            for k, r in enumerate(runs):
                counts[:, r] = (draws == k).sum(1)
        boot = all_scores(models, counts, test_size)
    for name in (*SCORES, *(k for k in point if k.startswith("psi_"))):
        value = float(point[name][0])
        row[name] = None if math.isnan(value) else value
        low = high = None
        if boot is not None and row[name] is not None:
            kept = boot[name][~np.isnan(boot[name])]
            if len(kept):
                low, high = (float(q) for q in np.percentile(kept, [2.5, 97.5]))
        if name in SCORES:
            row[f"{name}_low"], row[f"{name}_high"] = low, high
    return row
