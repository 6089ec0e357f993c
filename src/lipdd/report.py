"""Figures and tables across training runs: double descent of the error and of the Lipschitz
estimate (mean Jacobian operator norm on training points) against width and against epoch.

Reads only MLflow: the finished training runs of experiment `name` with the report's data, model
family and label noise; where those runs disagree in another training parameter (two sweeps, say
Adam and SGD), only the ones with the report's value of it (runs.for_report). Runs at one width (seeds,
reruns) are averaged (plain mean; `n_runs` says how many). matplotlib's Figure without pyplot: no
display, no global backend state.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator

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
    return (norm, parsed[2]) if norm != parsed[1] and norm.removesuffix("_target") in names.NORMALIZATIONS else None


def drawable(run) -> bool:
    return "test_error" in run.data.metrics or any(map(opnorm, run.data.metrics))


def collect(client, runs) -> tuple[dict[int, list], list[str]]:
    """Per width, (run id, final values, per-epoch operator norms) of each run, and the
    normalizations found. Final = MLflow's latest value, the one at the highest step."""
    by_width, norms = defaultdict(list), set()
    for r in runs:
        metrics = r.data.metrics
        final = {k: metrics.get(k) for k in names.ERRORS}
        series = {}
        for key, value in metrics.items():
            if found := opnorm(key):
                norms.add(found[0])
                col = names.opnorm_column(*found)
                final[col] = value
                # Same tie-break as MLflow's latest value when a step was logged twice (stats rerun).
                history = sorted(client.get_metric_history(r.info.run_id, key),
                                 key=lambda h: (h.step, h.timestamp, h.value))
                series[col] = {h.step: h.value for h in history}
        by_width[int(r.data.params["width"])].append((r.info.run_id, final, series))
    order = sorted(norms, key=lambda n: (names.NORMALIZATIONS.index(n.removesuffix("_target")), n))
    return by_width, order


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def tables(by_width: dict[int, list], norms: list[str]) -> tuple[list[dict], list[dict]]:
    columns = [names.opnorm_column(n, s) for n in norms for s in SUMMARIES]
    width_rows, epoch_rows = [], []
    for width in sorted(by_width):
        group = by_width[width]
        width_rows.append({"width": width, "n_runs": len(group),
                           **{c: mean([final.get(c) for _, final, _ in group])
                              for c in (*names.ERRORS, *columns)},
                           "run_ids": ";".join(run_id for run_id, _, _ in group)})
        for epoch in sorted({e for _, _, series in group for s in series.values() for e in s}):
            epoch_rows.append({"width": width, "epoch": epoch,
                               **{c: mean([series.get(c, {}).get(epoch) for _, _, series in group])
                                  for c in columns}})
    return width_rows, epoch_rows


def points(rows: list[dict], x: str, y: str) -> tuple[list, list]:
    pairs = [(row[x], row[y]) for row in rows if row[y] is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def width_axis(ax, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter("{x:g}")  # 1, 2, 4 ... 64 rather than 2^0 ... 2^6
    ax.set(xlabel="width", ylabel=ylabel, title=title)
    ax.legend()


def panels(norms: list[str], title: str) -> tuple[Figure, list]:
    """One panel per normalization, side by side: logit and softmax norms differ by ~100x."""
    fig = Figure(figsize=(5 * max(1, len(norms)), 4), layout="constrained")
    axes = list(fig.subplots(1, max(1, len(norms)), squeeze=False)[0])
    fig.suptitle(f"{title}\nmean Jacobian operator norm on training points")
    if not norms:
        axes[0].text(0.5, 0.5, "no Jacobian statistics yet:\nrun `lipdd stats`", ha="center",
                     transform=axes[0].transAxes)
    return fig, axes


def save(fig: Figure, path: Path) -> Path:
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    return files.write_bytes(path, png.getvalue())


def draw(out: Path, title: str, norms: list[str], width_rows: list[dict], epoch_rows: list[dict]) -> list[Path]:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for key in names.ERRORS:
        ax.plot(*points(width_rows, "width", key), "o-", label=key.replace("_", " "))
    width_axis(ax, "final error", title)
    written = [save(fig, out / "error_vs_width.png")]

    fig, axes = panels(norms, f"{title}, last checkpoint")
    for ax, norm in zip(axes, norms):
        for summary in SUMMARIES:
            ax.plot(*points(width_rows, "width", names.opnorm_column(norm, summary)), "o-", label=LABELS[summary])
        width_axis(ax, "operator norm", f"normalization: {norm}")
    written.append(save(fig, out / "lipschitz_vs_width.png"))

    fig, axes = panels(norms, title)
    widths = [row["width"] for row in width_rows]
    colors = ScalarMappable(LogNorm(min(widths), max(widths)), "viridis")
    for ax, norm in zip(axes, norms):
        for width in widths:
            rows = [row for row in epoch_rows if row["width"] == width]
            ax.plot(*points(rows, "epoch", names.opnorm_column(norm, "mean")), color=colors.to_rgba(width))
        ax.set(xlabel="epoch", ylabel="operator norm", title=f"normalization: {norm}")
    if norms:
        bar = fig.colorbar(colors, ax=axes, label="width", ticks=LogLocator(base=2), format="{x:g}")
        bar.minorticks_off()
    written.append(save(fig, out / "lipschitz_vs_epoch.png"))
    return written


def report(cfg: Config) -> list[Path]:
    """Draw the report for cfg's data, model family and label noise; returns the files written,
    also logged as artifacts of a new report run in the same experiment."""
    client = tracking.get_client(tracking.tracking_uri(cfg.tracking_uri), create=False)
    exp_id, drawn = runs.for_report(client, cfg, drawable)
    by_width, norms = collect(client, drawn)
    width_rows, epoch_rows = tables(by_width, norms)
    out = Path(cfg.results_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    title = f"{cfg.model} on {cfg.data}, label noise {cfg.label_noise:g}"
    written = [files.write_csv(out / "by_width.csv", width_rows), files.write_csv(out / "by_epoch.csv", epoch_rows),
               *draw(out, title, norms, width_rows, epoch_rows)]

    run = client.create_run(exp_id, run_name=f"report-{cfg.model}-{cfg.data}-noise{cfg.label_noise:g}",
                            tags={runs.KIND: "report"})
    with runs.ending(client, run.info.run_id):
        tracking.log_params(client, run.info.run_id, dict(data=cfg.data, model=cfg.model, label_noise=cfg.label_noise,
                                                          n_runs=len(drawn), widths=sorted(by_width)))
        for path in written:
            client.log_artifact(run.info.run_id, str(path))
    return written
