"""The report's figures: double descent of the error and of the Lipschitz estimate (mean Jacobian
operator norm on training points) against width and against epoch, every measure against width and
epoch with the interpolation threshold marked, and the estimate on and off the training points
(probe sets). matplotlib's Figure without pyplot: no display, no global backend state."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from .. import files, names
from ..measures import MEASURES
from .tables import SUMMARIES, best_first, interpolation_threshold, probe_summary

LABELS = {"mean": "all", "clean_mean": "clean", "corrupted_mean": "corrupted"}


def points(rows: list[dict], x: str, y: str) -> tuple[list, list]:
    pairs = [(row[x], row[y]) for row in rows if row.get(y) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def line(ax, rows: list[dict], x: str, y: str, fmt: str = "-", **style) -> None:
    """The mean of column y against x and, where rows hold several runs (seeds), its 95%
    interval as a band of the line's colour."""
    (drawn,) = ax.plot(*points(rows, x, y), fmt, **style)
    band = [
        (row[x], row[f"{y}_low"], row[f"{y}_high"])
        for row in rows
        if row.get(f"{y}_low") is not None and row.get(f"{y}_high") is not None
    ]
    if band:
        xs, low, high = zip(*band)
        ax.fill_between(xs, low, high, color=drawn.get_color(), alpha=0.2, linewidth=0)


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


PANELS = 12  # at most per figure: panels large enough to read
GROUPS = {
    "sample": "per-sample statistics on the training points",
    "network": "per-network measures",
    "baseline": "the field's generalisation measures (baselines)",
    "probe": "off the training points, mean over each probe set",
}
BASELINE_KEYS = {k for m in MEASURES.values() if m.baseline for k in m.keys}
LINE_LABELS = {**LABELS, "max": "max", "p99": "99th percentile"}


def panels_of(keys: list[str]) -> dict[str, dict[str, dict[str, str]]]:
    """group -> panel -> line -> column of the measures drawn: a panel per statistic on the
    training points (a line per summary: all, clean, corrupted, and the max where stats logs it),
    one per per-network measure (the baselines in a group of their own), and one per statistic on
    the probe sets (a line per probe set;
    the operator norm's are drawn beside the training points' in smoothness_vs_width.png).
    Standard errors and other summaries stay in the CSVs."""
    drawn: dict[str, dict[str, dict[str, str]]] = {g: {} for g in GROUPS}
    for key in keys:
        if parsed := names.parse_summary_key(key):
            _, stat, summary = parsed
            if summary in LINE_LABELS:
                drawn["sample"].setdefault(stat, {})[summary] = key
        elif found := probe_summary(key):
            probe, stat, summary = found
            if summary == "mean" and not stat.startswith(names.OPNORM):
                drawn["probe"].setdefault(stat, {})[probe] = key
        elif not key.endswith("_se"):
            drawn["baseline" if key in BASELINE_KEYS else "network"][key] = {key: key}
    order = list(LINE_LABELS)  # all, clean, corrupted, max, ...; probe sets by name
    for by_panel in drawn.values():
        for panel, lines in by_panel.items():
            by_panel[panel] = dict(
                sorted(
                    lines.items(),
                    key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]),
                )
            )
    return {group: by_panel for group, by_panel in drawn.items() if by_panel}


def width_colour(i: int, n: int):
    """The i-th of n widths' colour: matplotlib's ten distinct colours, or twenty when there are
    more (beyond that colours repeat, and the legend's order tells them apart)."""
    return matplotlib.colormaps["tab10" if n <= 10 else "tab20"](i % (10 if n <= 10 else 20))


def grid(n: int, title: str) -> tuple[Figure, list]:
    cols = min(4, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(4 * cols, 3.2 * rows))
    fig.subplots_adjust(left=0.08, right=0.98, top=0.85, bottom=0.12, wspace=0.35, hspace=0.55)
    fig.suptitle(title)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def pages(by_panel: dict) -> list[tuple[str, list]]:
    """(file name suffix, panels) of each figure: PANELS at most to a figure."""
    items = list(by_panel.items())
    chunks = [items[i : i + PANELS] for i in range(0, len(items), PANELS)]
    return [("" if i == 0 else f"_{i + 1}", chunk) for i, chunk in enumerate(chunks)]


def draw_measures(
    out: Path, title: str, keys: list[str], width_rows, epoch_rows, correlation
) -> list[Path]:
    """A figure of each group of measures (panels_of) against width, and of the training points'
    and per-network ones against epoch (the first line of each panel, one curve per width);
    the correlation of each measure with test error."""
    threshold = interpolation_threshold(width_rows)
    widths = [row["width"] for row in width_rows]
    written, drawn = [], panels_of(keys)
    for group, by_panel in drawn.items():
        for suffix, chunk in pages(by_panel):
            fig, axes = grid(len(chunk), f"{title}, last checkpoint: {GROUPS[group]}")
            for ax, (panel, lines) in zip(axes, chunk):
                for i, (name, key) in enumerate(lines.items()):
                    line(
                        ax,
                        width_rows,
                        "width",
                        key,
                        "os^vD<>px"[i % 9] + "-",
                        label=LINE_LABELS.get(name, name),
                        markerfacecolor="none",
                    )
                log_if_decades(ax, [row.get(key) for row in width_rows for key in lines.values()])
                width_axis(ax, "", panel, threshold, legend=False)
                ax.title.set_fontsize(9)
            most = max(range(len(chunk)), key=lambda i: len(chunk[i][1]))  # one legend, the fullest
            axes[most].legend(fontsize=7)
            written.append(save(fig, out / f"{group}_measures_vs_width{suffix}.png"))
            if group == "probe":
                continue
            fig, axes = grid(len(chunk), f"{title}: {GROUPS[group]}")
            for ax, (panel, lines) in zip(axes, chunk):
                key = next(iter(lines.values()))
                for i, width in enumerate(widths):
                    rows = [row for row in epoch_rows if row["width"] == width]
                    line(
                        ax,
                        rows,
                        "epoch",
                        key,
                        color=width_colour(i, len(widths)),
                        label=f"width {width}",
                    )
                log_if_decades(ax, [row.get(key) for row in epoch_rows])
                ax.set(xlabel="epoch", title=key)
                ax.title.set_fontsize(9)
            axes[0].legend(fontsize=7)
            written.append(save(fig, out / f"{group}_measures_vs_epoch{suffix}.png"))

    keys = {
        key for by_panel in drawn.values() for lines in by_panel.values() for key in lines.values()
    }
    written.append(draw_correlation(out, title, [r for r in correlation if r["measure"] in keys]))
    return written


SCORED = {
    "spearman_rho": ("Spearman's rho across widths", (-1, 1)),
    "kendall_tau": ("Kendall's tau across widths", (-1, 1)),
    "psi": ("granulated Kendall Psi", (-1, 1)),
    "robust_sign_error": ("robust sign error (lower: better)", (0, 1)),
}


def draw_correlation(out: Path, title: str, correlation: list[dict]) -> Path:
    """A panel per score, a bar per measure with its 95% interval, best granulated Psi first."""
    scored = [r for r in correlation if any(r.get(name) is not None for name in SCORED)]
    shown = best_first(scored)[::-1]  # barh draws bottom up
    fig = Figure(figsize=(4 * len(SCORED), 0.3 * len(shown) + 1.8), layout="constrained")
    axes = fig.subplots(1, len(SCORED), sharey=True, squeeze=False)[0]
    fig.suptitle(f"{title}\nhow each measure tracks test error (bars: 95% bootstrap interval)")
    y = list(range(len(shown)))
    for ax, (name, (label, limits)) in zip(axes, SCORED.items()):
        values = [r.get(name) if r.get(name) is not None else math.nan for r in shown]
        good = (lambda v: v <= 0.5) if name.endswith("sign_error") else (lambda v: v >= 0)
        ax.barh(y, values, color=["C0" if good(v) else "C3" for v in values])
        # The interval as a segment of its own: a percentile bootstrap interval need not hold
        # the point estimate, so it is no symmetric-or-not error bar around the bar's end.
        bounds = [(i, r[f"{name}_low"], r[f"{name}_high"]) for i, r in enumerate(shown)]
        bounds = [b for b in bounds if b[1] is not None and b[2] is not None]
        if bounds:
            ax.hlines(*zip(*bounds), color="black", linewidth=1.5)
        ax.set(xlim=limits, xlabel=label)
    axes[0].set_yticks(y, [r["measure"] for r in shown], fontsize=7)
    return save(fig, out / "correlation.png")


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
            line(ax, width_rows, "width", key, "os^vD<>px"[i % 9] + "-", label=label)
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


PAPER_LINES = {  # the right panel of double_descent.png: label -> measures_by_width column
    "upper bound (product of the maps' norms)": "lipschitz_upper_bound",
    "lower bound (largest on the training points)": names.summary_key(
        "train", names.stat(names.OPNORM, "none"), "max"
    ),
    "mean on the training points (the paper's estimate)": names.summary_key(
        "train", names.stat(names.OPNORM, "none"), "mean"
    ),
}


def draw_paper(out: Path, title: str, width_rows: list[dict], measure_rows: list[dict]) -> Path:
    """The paper's figure: train and test error against width beside the Lipschitz constant's
    bounds and estimate (logits), the interpolation threshold marked in both."""
    threshold = interpolation_threshold(width_rows)
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    fig.suptitle(f"{title}, last checkpoint")
    for key in names.ERRORS:
        line(left, width_rows, "width", key, "o-", label=key.replace("_", " "))
    width_axis(left, "error", "double descent of the test error", threshold)
    for i, (label, key) in enumerate(PAPER_LINES.items()):
        line(right, measure_rows, "width", key, "so^"[i] + "-", label=label)
    log_if_decades(right, [row.get(k) for row in measure_rows for k in PAPER_LINES.values()])
    width_axis(
        right, "Lipschitz constant of the logits", "and of the Lipschitz constant", threshold
    )
    right.legend(fontsize=7)
    return save(fig, out / "double_descent.png")


def draw(
    out: Path, title: str, norms: list[str], width_rows: list[dict], epoch_rows: list[dict]
) -> list[Path]:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for key in names.ERRORS:
        line(ax, width_rows, "width", key, "o-", label=key.replace("_", " "))
    threshold = interpolation_threshold(width_rows)
    width_axis(ax, "final error", title, threshold)
    written = [save(fig, out / "error_vs_width.png")]

    fig, axes = panels(norms, f"{title}, last checkpoint")
    for ax, norm in zip(axes, norms):
        for summary in SUMMARIES:
            line(
                ax,
                width_rows,
                "width",
                names.opnorm_column(norm, summary),
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
            colour = width_colour(i, len(widths))
            line(ax, rows, "epoch", column, color=colour, label=f"width {width}")
        log_if_decades(ax, [row.get(column) for row in epoch_rows])
        ax.set(xlabel="epoch", ylabel="operator norm", title=f"normalization: {norm}")
        ax.legend(fontsize=7, ncol=1 + len(widths) // 12)
    written.append(save(fig, out / "lipschitz_vs_epoch.png"))
    return written
