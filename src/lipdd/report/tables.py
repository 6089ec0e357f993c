"""The report's tables: every finished run's final and per-epoch values of the errors and of each
measure `lipdd stats` logged, their means per width (and epoch) over the runs there (seeds,
reruns; `n_runs` says how many) with a 95% bootstrap interval, the interpolation threshold (the
first width whose training error on the noisy labels is 0), and how well each measure tracks test
error (lipdd.report.scores)."""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from .. import names
from ..measures import MEASURES, PROBES
from . import scores

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


class Run(NamedTuple):
    """One training run as the report reads it: final values (MLflow's latest) of the errors and
    of every measure, each measure's and the test error's values by epoch, and what the scores
    need to tell runs apart."""

    run_id: str
    final: dict[str, float | None]
    series: dict[str, dict[int, float]]
    test_error: dict[int, float]
    seed: str | None = None
    label_noise: str | None = None
    test_size: int | None = None  # samples behind each test error


def history(client, run_id: str, key: str) -> dict[int, float]:
    # Same tie-break as MLflow's latest value when a step was logged twice (stats rerun).
    logged = sorted(
        client.get_metric_history(run_id, key), key=lambda h: (h.step, h.timestamp, h.value)
    )
    return {h.step: h.value for h in logged}


def collect(client, runs) -> tuple[dict[int, list[Run]], list[str]]:
    """Per width, the Run of each run, and the normalizations of the operator norm found.
    Operator norm summaries also under their opnorm_* columns."""
    by_width, norms = defaultdict(list), set()
    for r in tqdm(runs, desc="report: reading runs", unit="run", disable=not sys.stderr.isatty()):
        metrics = r.data.metrics
        final = {k: metrics.get(k) for k in names.ERRORS}
        series = {}
        for key, value in metrics.items():
            if not is_measure(key):
                continue
            final[key], series[key] = value, history(client, r.info.run_id, key)
            if found := opnorm(key):
                norms.add(found[0])
                col = names.opnorm_column(*found)
                final[col], series[col] = value, series[key]
        size = r.data.tags.get("test_size")
        by_width[int(r.data.params["width"])].append(
            Run(
                r.info.run_id,
                final,
                series,
                history(client, r.info.run_id, "test_error") if "test_error" in metrics else {},
                r.data.params.get("seed"),
                r.data.params.get("label_noise"),
                int(size) if size else None,
            )
        )
    order = sorted(norms, key=lambda n: (names.NORMALIZATIONS.index(n.removesuffix("_target")), n))
    return by_width, order


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def interval(values: list, rng, rounds: int = scores.ROUNDS) -> tuple[float | None, float | None]:
    """95% bootstrap interval of the mean of `values` (None left out): (None, None) under two."""
    values = np.array([v for v in values if v is not None], dtype=np.float64)
    if len(values) < 2:
        return None, None
    means = values[rng.integers(0, len(values), (rounds, len(values)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarised(columns, values_of, rng) -> dict:
    """Each column's mean over the runs and, where there are several, its `_low` and `_high`
    bootstrap bounds."""
    row = {}
    for c in columns:
        values = values_of(c)
        row[c] = mean(values)
        row[f"{c}_low"], row[f"{c}_high"] = interval(values, rng)
    return row


def tables(
    by_width: dict[int, list[Run]], columns: list[str], seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Per width, the mean over its runs (seeds) of the errors and `columns` at the last
    checkpoint, with a 95% bootstrap interval; per width and epoch, the same of `columns`."""
    rng = np.random.default_rng(seed)
    width_rows, epoch_rows = [], []
    for width in sorted(by_width):
        group = by_width[width]
        width_rows.append(
            {
                "width": width,
                "n_runs": len(group),
                **summarised(
                    (*names.ERRORS, *columns), lambda c: [r.final.get(c) for r in group], rng
                ),
                "run_ids": ";".join(r.run_id for r in group),
            }
        )
        for epoch in sorted({e for r in group for s in r.series.values() for e in s}):
            epoch_rows.append(
                {
                    "width": width,
                    "epoch": epoch,
                    **summarised(
                        columns, lambda c: [r.series.get(c, {}).get(epoch) for r in group], rng
                    ),
                }
            )
    return width_rows, epoch_rows


def interpolation_threshold(width_rows: list[dict]) -> int | None:
    """The first width whose (mean) training error on the noisy labels is 0."""
    return next((row["width"] for row in width_rows if row["train_error"] == 0), None)


def models(by_width: dict[int, list[Run]], key: str) -> scores.Models | None:
    """The models of measure `key`: every epoch of a run where both it and the test error were
    logged (its final values where none was), in the runs that have it."""
    value, error, run, hparams, run_width, run_value, run_error = [], [], [], [], [], [], []
    for width in sorted(by_width):
        for r in by_width[width]:
            final = r.final.get(key), r.final.get("test_error")
            if None in final:
                continue
            series = r.series.get(key, {})
            at = {e: (series[e], r.test_error[e]) for e in sorted(series) if e in r.test_error}
            for epoch, (v, t) in (at or {"final": final}).items():
                value.append(v)
                error.append(t)
                run.append(len(run_width))
                hparams.append(
                    {"width": width, "seed": r.seed, "label_noise": r.label_noise, "epoch": epoch}
                )
            run_width.append(width)
            run_value.append(final[0])
            run_error.append(final[1])
    if not run_width:
        return None
    return scores.Models(
        *(np.array(a, dtype=np.float64) for a in (value, error)),
        np.array(run),
        hparams,
        run_width,
        *(np.array(a, dtype=np.float64) for a in (run_value, run_error)),
    )


def correlations(by_width: dict[int, list[Run]], keys: list[str], seed: int = 0) -> list[dict]:
    """Per measure, every score of how it tracks test error (lipdd.report.scores) with its 95%
    bootstrap interval over the runs of each width."""
    sizes = {r.test_size for group in by_width.values() for r in group}
    test_size = sizes.pop() if len(sizes) == 1 else None  # unknown, or runs that disagree
    rows = []
    for key in keys:
        found = models(by_width, key)
        row = {"measure": key, "n_widths": 0, "n_runs": 0}
        if found is not None:
            row.update(n_widths=len(set(found.run_width)), n_runs=len(found.run_width))
            row.update(scores.score(found, test_size, seed=seed))
        rows.append(row)
    return rows


def best_first(correlation: list[dict]) -> list[dict]:
    """The correlation rows by granulated Psi, best first; those without one last."""
    return sorted(correlation, key=lambda r: -r["psi"] if r.get("psi") is not None else 2)


def ranking_table(correlation: list[dict]) -> list[list[str]]:
    """The measures as table rows (a header first), best granulated Psi first: each score with
    its interval."""

    def cell(row, name):
        value, low, high = row.get(name), row.get(f"{name}_low"), row.get(f"{name}_high")
        if value is None:
            return "-"
        return f"{value:+.2f}" + (f" [{low:+.2f}, {high:+.2f}]" if low is not None else "")

    columns = [
        ("Spearman rho", "spearman_rho"),
        ("Kendall tau", "kendall_tau"),
        ("granulated Psi", "psi"),
        ("robust sign error", "robust_sign_error"),
    ]
    table = [["measure", *(title for title, _ in columns)]]
    table += [
        [r["measure"], *(cell(r, name) for _, name in columns)] for r in best_first(correlation)
    ]
    return table


def ranking(correlation: list[dict]) -> str:
    """ranking_table as aligned text."""
    table = ranking_table(correlation)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join([line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:], widths[1:]))])
        for line in table
    )
