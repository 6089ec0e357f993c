"""`lipdd report`: figures and tables across the finished training runs of one setting, logged
as a report run.

Reads only MLflow: the finished training runs of experiment `name` with the report's data, model
family and label noise; where those runs disagree in another training parameter (two sweeps, say
Adam and SGD), only the ones with the report's value of it (runs.for_report)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .. import files, names, runs, tracking
from ..config import Config
from .figures import draw, draw_measures, draw_paper, draw_smoothness
from .page import write_page
from .tables import SUMMARIES, collect, correlations, drawable, is_measure, ranking, tables


def report(cfg: Config) -> list[Path]:
    """Draw the report for cfg's data, model family and label noise; returns the files written,
    also logged as artifacts of a new report run in the same experiment."""
    client = tracking.get_client(tracking.tracking_uri(cfg.tracking_uri), create=False)
    drawn = runs.for_report(client, cfg, drawable)
    by_width, norms = collect(client, drawn)
    print(
        f"report: drawing {len(drawn)} runs of experiment {cfg.name!r}: "
        + "; ".join(
            f"width {w}: {', '.join(r.run_id for r in by_width[w])}" for w in sorted(by_width)
        ),
        file=sys.stderr,
    )
    width_rows, epoch_rows = tables(
        by_width, [names.opnorm_column(n, s) for n in norms for s in SUMMARIES]
    )
    keys = sorted(
        {k for group in by_width.values() for r in group for k in r.final if is_measure(k)}
    )
    measure_rows, measure_epoch_rows = tables(by_width, keys)
    correlation = correlations(by_width, keys)
    print(ranking(correlation))
    out = Path(cfg.results_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    epochs = sorted({int(r.data.params["epochs"]) for r in drawn if "epochs" in r.data.params})
    length = f"{epochs[0]}" if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}" if epochs else "?"
    title = (
        f"{cfg.model} on {cfg.data}, label noise {cfg.label_noise:g}, {length} epochs, "
        f"{len(drawn)} runs ({len(by_width)} widths)"
    )
    written = [
        files.write_csv(out / "by_width.csv", width_rows),
        files.write_csv(out / "by_epoch.csv", epoch_rows),
        draw_paper(out, title, width_rows, measure_rows),
        *draw(out, title, norms, width_rows, epoch_rows),
        files.write_csv(out / "measures_by_width.csv", measure_rows),
        files.write_csv(out / "measures_by_epoch.csv", measure_epoch_rows),
        files.write_csv(out / "correlation.csv", correlation),
        *draw_measures(out, title, keys, measure_rows, measure_epoch_rows, correlation),
        *draw_smoothness(out, title, norms, keys, measure_rows),
    ]
    written.append(write_page(out, title, written, correlation))

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
