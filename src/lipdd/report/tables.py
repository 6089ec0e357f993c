"""The report's tables: every finished run's final and per-epoch values of the errors and of each
measure `lipdd stats` logged, their means per width (and epoch), the interpolation threshold (the
first width whose training error on the noisy labels is 0), and how well each measure tracks test
error across widths (Spearman's rho, with a bootstrap interval over the runs of each width). Runs at
one width (seeds, reruns) are averaged (plain mean; `n_runs` says how many)."""

from __future__ import annotations

import math
import sys
from collections import defaultdict

import numpy as np
from scipy.stats import spearmanr
from tqdm import tqdm

from .. import names
from ..measures import MEASURES, PROBES

SUMMARIES = names.LOGGED_SUMMARIES  # drawn from the runs' metrics


def opnorm(key: str) -> tuple[str, str] | None:
    """(normalization, summary) of a per-checkpoint summary of the operator norm on training
    points, e.g. train_jacobian_operator_norm_softmax_clean_mean; None for any other metric."""
    parsed = names.parse_summary_key(key)
    if parsed is None or parsed[0] != "train" or parsed[2] not in SUMMARIES:
        return None
    norm = parsed[1].removeprefix(names.OPNORM + "_")
    return (
        (norm, parsed[2])
        if norm != parsed[1] and norm.removesuffix("_target") in names.NORMALIZATIONS
        else None
    )


def probe_summary(key: str) -> tuple[str, str, str] | None:
    """(probe, statistic, summary) of a probe set's summary, e.g.
    probe_shift_path_jacobian_operator_norm_none_mean; None for any other metric."""
    for probe in sorted(PROBES, key=len, reverse=True):  # shift_path before shift...
        rest = key.removeprefix(f"probe_{probe}_")
        if rest != key:
            summary = next(
                (
                    s
                    for s in sorted(names.SUMMARIES, key=len, reverse=True)
                    if rest.endswith("_" + s)
                ),
                None,
            )
            return (probe, rest[: -len(summary) - 1], summary) if summary else None
    return None


def is_measure(key: str) -> bool:
    """Whether an MLflow metric is a per-checkpoint measure: a logged summary of a statistic on
    the training points or on a probe set, or a per-network measure's key."""
    parsed = names.parse_summary_key(key)
    if parsed is not None:
        logged = {k for m in MEASURES.values() for k in m.logged}
        return parsed[0] == "train" and parsed[2] in logged
    if probe_summary(key) is not None:
        return True
    return any(key in m.keys for m in MEASURES.values())


def drawable(run) -> bool:
    return "test_error" in run.data.metrics or any(map(opnorm, run.data.metrics))


def collect(client, runs) -> tuple[dict[int, list], list[str]]:
    """Per width, (run id, final values, per-epoch values of every measure) of each run, and the
    normalizations of the operator norm found. Final = MLflow's latest value, the one at the
    highest step; operator norm summaries also under their opnorm_* columns."""
    by_width, norms = defaultdict(list), set()
    for r in tqdm(runs, desc="report: reading runs", unit="run", disable=not sys.stderr.isatty()):
        metrics = r.data.metrics
        final = {k: metrics.get(k) for k in names.ERRORS}
        series = {}
        for key, value in metrics.items():
            if not is_measure(key):
                continue
            # Same tie-break as MLflow's latest value when a step was logged twice (stats rerun).
            history = sorted(
                client.get_metric_history(r.info.run_id, key),
                key=lambda h: (h.step, h.timestamp, h.value),
            )
            final[key], series[key] = value, {h.step: h.value for h in history}
            if found := opnorm(key):
                norms.add(found[0])
                col = names.opnorm_column(*found)
                final[col], series[col] = value, series[key]
        by_width[int(r.data.params["width"])].append((r.info.run_id, final, series))
    order = sorted(norms, key=lambda n: (names.NORMALIZATIONS.index(n.removesuffix("_target")), n))
    return by_width, order


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def tables(by_width: dict[int, list], columns: list[str]) -> tuple[list[dict], list[dict]]:
    """Per width, the mean over its runs of the errors and `columns` at the last checkpoint; per
    width and epoch, of `columns`."""
    width_rows, epoch_rows = [], []
    for width in sorted(by_width):
        group = by_width[width]
        width_rows.append(
            {
                "width": width,
                "n_runs": len(group),
                **{
                    c: mean([final.get(c) for _, final, _ in group])
                    for c in (*names.ERRORS, *columns)
                },
                "run_ids": ";".join(run_id for run_id, _, _ in group),
            }
        )
        for epoch in sorted({e for _, _, series in group for s in series.values() for e in s}):
            epoch_rows.append(
                {
                    "width": width,
                    "epoch": epoch,
                    **{
                        c: mean([series.get(c, {}).get(epoch) for _, _, series in group])
                        for c in columns
                    },
                }
            )
    return width_rows, epoch_rows


def interpolation_threshold(width_rows: list[dict]) -> int | None:
    """The first width whose (mean) training error on the noisy labels is 0."""
    return next((row["width"] for row in width_rows if row["train_error"] == 0), None)


def correlations(
    by_width: dict[int, list], keys: list[str], rounds: int = 1000, seed: int = 0
) -> list[dict]:
    """Per measure, Spearman's rho between its final value and test error across widths (means
    over each width's runs) and, when some width has several runs, a 95% bootstrap interval:
    each round resamples every width's runs with replacement, measure and error together."""
    rng = np.random.default_rng(seed)
    rows = []
    for key in keys:
        groups = [
            [(final.get(key), final.get("test_error")) for _, final, _ in by_width[w]]
            for w in sorted(by_width)
        ]
        groups = [[p for p in g if None not in p] for g in groups]
        groups = [np.array(g, dtype=np.float64) for g in groups if g]
        rho = _rho([g.mean(0) for g in groups])
        low = high = None
        if any(len(g) > 1 for g in groups):
            boot = [
                _rho([g[rng.integers(0, len(g), len(g))].mean(0) for g in groups])
                for _ in range(rounds)
            ]
            boot = [b for b in boot if not math.isnan(b)]
            if boot:
                low, high = (float(q) for q in np.percentile(boot, [2.5, 97.5]))
        rows.append(
            {
                "measure": key,
                "spearman_rho": rho,
                "ci_low": low,
                "ci_high": high,
                "n_widths": len(groups),
                "n_runs": sum(len(g) for g in groups),
            }
        )
    return rows


def _rho(pairs: list) -> float:
    if len(pairs) < 3:
        return math.nan
    x, y = np.array(pairs).T
    return float(spearmanr(x, y).statistic) if np.ptp(x) > 0 and np.ptp(y) > 0 else math.nan
