"""Figures and tables across training runs: double descent of the error and of the Lipschitz
estimate (mean Jacobian operator norm on training points) against width and against epoch; every
measure `lipdd stats` logged against width and epoch, the interpolation threshold (the first width
whose training error on the noisy labels is 0) marked; the estimate on and off the training points
(probe sets) against width; and how well each measure tracks test error across widths (Spearman's
rho, with a bootstrap interval over the runs of each width).

Reads only MLflow: the finished training runs of experiment `name` with the report's data, model
family and label noise; where those runs disagree in another training parameter (two sweeps, say
Adam and SGD), only the ones with the report's value of it (runs.for_report). Runs at one width (seeds,
reruns) are averaged (plain mean; `n_runs` says how many). matplotlib's Figure without pyplot: no
display, no global backend state.
"""

from __future__ import annotations

import io
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from scipy.stats import spearmanr
from tqdm import tqdm

from . import files, names, runs, tracking
from .config import Config

SUMMARIES = names.LOGGED_SUMMARIES  # drawn from the runs' metrics
LABELS = {"mean": "all", "clean_mean": "clean", "corrupted_mean": "corrupted"}


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
    from .probes import PROBES  # imports torch: only when a report is drawn

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
    from .measures import MEASURES  # imports torch: only when a report is drawn

    parsed = names.parse_summary_key(key)
    if parsed is not None:
        return parsed[0] == "train" and parsed[2] in names.LOGGED_SUMMARIES + names.LOGGED_EXTREMES
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


def points(rows: list[dict], x: str, y: str) -> tuple[list, list]:
    pairs = [(row[x], row[y]) for row in rows if row.get(y) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def interpolation_threshold(width_rows: list[dict]) -> int | None:
    """The first width whose (mean) training error on the noisy labels is 0."""
    return next((row["width"] for row in width_rows if row["train_error"] == 0), None)


def width_axis(
    ax, ylabel: str, title: str, threshold: int | None = None, legend: bool = True
) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter("{x:g}")  # 1, 2, 4 ... 64 rather than 2^0 ... 2^6
    if threshold is not None:
        ax.axvline(
            threshold, color="gray", linestyle="--", linewidth=1, label="interpolation threshold"
        )
    ax.set(xlabel="width", ylabel=ylabel, title=title)
    if legend:
        ax.legend()


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


def drawn_measures(keys: list[str]) -> list[str]:
    """The measures a figure gets a panel for: each statistic's mean (and the operator norm's
    max), each per-network measure but standard errors."""

    def wanted(key):
        parsed = names.parse_summary_key(key)
        if parsed is None and (probe := probe_summary(key)):
            parsed = probe
        if parsed is None:
            return not key.endswith("_se")
        return parsed[2] == "mean" or (parsed[2] == "max" and parsed[1].startswith(names.OPNORM))

    return [k for k in keys if wanted(k)]


def width_colour(i: int, n: int):
    """The i-th of n widths' colour: matplotlib's ten distinct colours, or twenty when there are more
    (beyond that colours repeat, and the legend's order tells them apart)."""
    return matplotlib.colormaps["tab10" if n <= 10 else "tab20"](i % (10 if n <= 10 else 20))


def grid(n: int, title: str) -> tuple[Figure, list]:
    cols = min(4, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(4 * cols, 3.2 * rows), layout="constrained")
    fig.suptitle(title)
    return fig, list(fig.subplots(rows, cols, squeeze=False).flat)


def draw_measures(
    out: Path, title: str, keys: list[str], width_rows, epoch_rows, correlation
) -> list[Path]:
    threshold = interpolation_threshold(width_rows)
    keys = drawn_measures(keys)
    fig, axes = grid(len(keys), f"{title}, last checkpoint")
    for ax, key in zip(axes, keys):
        ax.plot(*points(width_rows, "width", key), "o-")
        width_axis(ax, "", key, threshold, legend=False)
        ax.title.set_fontsize(9)
    written = [save(fig, out / "measures_vs_width.png")]

    fig, axes = grid(len(keys), title)
    widths = [row["width"] for row in width_rows]
    for ax, key in zip(axes, keys):
        for i, width in enumerate(widths):
            rows = [row for row in epoch_rows if row["width"] == width]
            ax.plot(
                *points(rows, "epoch", key),
                color=width_colour(i, len(widths)),
                label=f"width {width}",
            )
        ax.set(xlabel="epoch", title=key)
        ax.title.set_fontsize(9)
    if keys:
        axes[0].legend(fontsize=7)
    written.append(save(fig, out / "measures_vs_epoch.png"))

    shown = [r for r in correlation if r["measure"] in keys and not math.isnan(r["spearman_rho"])]
    fig = Figure(figsize=(7, 0.3 * len(shown) + 1.5), layout="constrained")
    ax = fig.subplots()
    y = list(range(len(shown)))
    rho = [r["spearman_rho"] for r in shown]
    err = [
        [r["spearman_rho"] - r["ci_low"] if r["ci_low"] is not None else 0 for r in shown],
        [r["ci_high"] - r["spearman_rho"] if r["ci_high"] is not None else 0 for r in shown],
    ]
    ax.barh(y, rho, xerr=err, color=["C0" if v >= 0 else "C3" for v in rho])
    ax.set_yticks(y, [r["measure"] for r in shown], fontsize=7)
    ax.set(
        xlim=(-1, 1),
        xlabel="Spearman's rho with test error across widths",
        title=f"{title}\n(bars: 95% bootstrap interval over runs, where a width has several)",
    )
    written.append(save(fig, out / "correlation.png"))
    return written


def draw_smoothness(
    out: Path, title: str, norms: list[str], keys: list[str], width_rows: list[dict]
) -> list[Path]:
    """The Lipschitz estimate (mean operator norm) on the training points and on every probe set
    against width, one panel per normalization."""
    probes = sorted({p[0] for k in keys if (p := probe_summary(k))})
    if not probes:
        return []
    fig, axes = panels(
        norms, f"{title}, last checkpoint", "on training points and off them (probe sets)"
    )
    for ax, norm in zip(axes, norms):
        stat = names.stat(names.OPNORM, norm)
        lines = [("training points", names.summary_key("train", stat, "mean"))]
        lines += [(probe, names.probe_key(probe, stat, "mean")) for probe in probes]
        for i, (label, key) in enumerate(lines):
            ax.plot(*points(width_rows, "width", key), marker="os^vD<>px"[i % 9], label=label)
        log_if_decades(ax, [v for _, key in lines for v in points(width_rows, "width", key)[1]])
        width_axis(
            ax,
            "mean operator norm",
            f"normalization: {norm}",
            interpolation_threshold(width_rows),
            False,
        )
        ax.legend(fontsize=7)
    return [save(fig, out / "smoothness_vs_width.png")]


def log_if_decades(ax, values: list[float]) -> None:
    """A log y axis where the values span more than a decade and a half (softmax norms fall
    100-fold past the threshold, and on a linear axis 0.01 and 0.001 both look like 0)."""
    values = [v for v in values if v is not None and v > 0]
    if values and max(values) > 30 * min(values):
        ax.set_yscale("log")


STYLES = {
    "mean": "o-",
    "clean_mean": "s--",
    "corrupted_mean": "^:",
}  # lines that stay visible when they coincide


def panels(norms: list[str], title: str, where: str = "on training points") -> tuple[Figure, list]:
    """One panel per normalization, side by side: logit and softmax norms differ by ~100x."""
    fig = Figure(figsize=(5 * max(1, len(norms)), 4), layout="constrained")
    axes = list(fig.subplots(1, max(1, len(norms)), squeeze=False)[0])
    fig.suptitle(f"{title}\nmean Jacobian operator norm {where}")
    if not norms:
        axes[0].text(
            0.5,
            0.5,
            "no Jacobian statistics yet:\nrun `lipdd stats`",
            ha="center",
            transform=axes[0].transAxes,
        )
    return fig, axes


def save(fig: Figure, path: Path) -> Path:
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    return files.write_bytes(path, png.getvalue())


def draw(
    out: Path, title: str, norms: list[str], width_rows: list[dict], epoch_rows: list[dict]
) -> list[Path]:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for key in names.ERRORS:
        ax.plot(*points(width_rows, "width", key), "o-", label=key.replace("_", " "))
    threshold = interpolation_threshold(width_rows)
    width_axis(ax, "final error", title, threshold)
    written = [save(fig, out / "error_vs_width.png")]

    fig, axes = panels(norms, f"{title}, last checkpoint")
    for ax, norm in zip(axes, norms):
        for summary in SUMMARIES:
            ax.plot(
                *points(width_rows, "width", names.opnorm_column(norm, summary)),
                STYLES[summary],
                label=LABELS[summary],
                markerfacecolor="none",
            )
        log_if_decades(
            ax, [row.get(names.opnorm_column(norm, s)) for row in width_rows for s in SUMMARIES]
        )
        width_axis(ax, "operator norm", f"normalization: {norm}", threshold)
    written.append(save(fig, out / "lipschitz_vs_width.png"))

    fig, axes = panels(norms, title)
    widths = [row["width"] for row in width_rows]
    for ax, norm in zip(axes, norms):
        column = names.opnorm_column(norm, "mean")
        for i, width in enumerate(
            widths
        ):  # one colour per width (tab20 after 10), named in the legend
            rows = [row for row in epoch_rows if row["width"] == width]
            ax.plot(
                *points(rows, "epoch", column),
                color=width_colour(i, len(widths)),
                label=f"width {width}",
            )
        log_if_decades(ax, [row.get(column) for row in epoch_rows])
        ax.set(xlabel="epoch", ylabel="operator norm", title=f"normalization: {norm}")
        ax.legend(fontsize=7, ncol=1 + len(widths) // 12)
    written.append(save(fig, out / "lipschitz_vs_epoch.png"))
    return written


def report(cfg: Config) -> list[Path]:
    """Draw the report for cfg's data, model family and label noise; returns the files written,
    also logged as artifacts of a new report run in the same experiment."""
    client = tracking.get_client(tracking.tracking_uri(cfg.tracking_uri), create=False)
    drawn = runs.for_report(client, cfg, drawable)
    by_width, norms = collect(client, drawn)
    print(
        f"report: drawing {len(drawn)} runs of experiment {cfg.name!r}: "
        + "; ".join(
            f"width {w}: {', '.join(run_id for run_id, _, _ in by_width[w])}"
            for w in sorted(by_width)
        ),
        file=sys.stderr,
    )
    width_rows, epoch_rows = tables(
        by_width, [names.opnorm_column(n, s) for n in norms for s in SUMMARIES]
    )
    keys = sorted(
        {k for group in by_width.values() for _, final, _ in group for k in final if is_measure(k)}
    )
    measure_rows, measure_epoch_rows = tables(by_width, keys)
    correlation = correlations(by_width, keys)
    out = Path(cfg.results_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    epochs = sorted({int(r.data.params["epochs"]) for r in drawn if "epochs" in r.data.params})
    length = f"{epochs[0]}" if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}" if epochs else "?"
    title = (
        f"{cfg.model} on {cfg.data}, label noise {cfg.label_noise:g}, {length} epochs, {len(drawn)} runs "
        f"({len(by_width)} widths)"
    )
    written = [
        files.write_csv(out / "by_width.csv", width_rows),
        files.write_csv(out / "by_epoch.csv", epoch_rows),
        *draw(out, title, norms, width_rows, epoch_rows),
        files.write_csv(out / "measures_by_width.csv", measure_rows),
        files.write_csv(out / "measures_by_epoch.csv", measure_epoch_rows),
        files.write_csv(out / "correlation.csv", correlation),
        *draw_measures(out, title, keys, measure_rows, measure_epoch_rows, correlation),
        *draw_smoothness(out, title, norms, keys, measure_rows),
    ]

    # Report runs have an experiment of their own: among the training runs they would be drawn in
    # charts, legends and counts as runs without metrics.
    reports = tracking.experiment_id(client, report_experiment(cfg.name))
    run = client.create_run(
        reports,
        run_name=f"report-{cfg.model}-{cfg.data}-noise{cfg.label_noise:g}-"
        f"{time.strftime('%Y%m%d-%H%M%S')}",
        tags={runs.KIND: "report", "lipdd.training_experiment": cfg.name},
    )
    with runs.ending(client, run.info.run_id):
        tracking.log_params(
            client,
            run.info.run_id,
            dict(
                data=cfg.data,
                model=cfg.model,
                label_noise=cfg.label_noise,
                n_runs=len(drawn),
                widths=sorted(by_width),
            ),
        )
        for path in written:
            client.log_artifact(run.info.run_id, str(path))
    return written


def report_experiment(name: str) -> str:
    """The MLflow experiment of the reports drawn from experiment `name`."""
    return f"{name}-reports"
