"""Which measure goes to which figure and panel, and that no figure gets more than 12 panels."""

import pytest

from lipdd.report import figures


def test_measures_are_grouped_into_panels_of_one_statistic():
    keys = [
        "train_jacobian_operator_norm_none_corrupted_mean",
        "train_jacobian_operator_norm_none_mean",
        "train_jacobian_operator_norm_none_max",
        "train_jacobian_operator_norm_none_clean_mean",
        "train_jacobian_operator_norm_none_median",  # in the CSVs only
        "train_accuracy_mean",
        "hessian_trace",
        "hessian_trace_se",  # in the CSVs only
        "lipschitz_upper_bound_over_max",
        "probe_between_accuracy_mean",
        "probe_worst_accuracy_mean",
        "probe_worst_accuracy_max",  # in the CSVs only
        "probe_worst_jacobian_operator_norm_none_mean",  # drawn in smoothness_vs_width.png
    ]
    assert figures.panels_of(keys) == {
        "sample": {
            "jacobian_operator_norm_none": {
                "mean": "train_jacobian_operator_norm_none_mean",
                "clean_mean": "train_jacobian_operator_norm_none_clean_mean",
                "corrupted_mean": "train_jacobian_operator_norm_none_corrupted_mean",
                "max": "train_jacobian_operator_norm_none_max",
            },
            "accuracy": {"mean": "train_accuracy_mean"},
        },
        "network": {
            "hessian_trace": {"hessian_trace": "hessian_trace"},
            "lipschitz_upper_bound_over_max": {
                "lipschitz_upper_bound_over_max": "lipschitz_upper_bound_over_max"
            },
        },
        "probe": {
            "accuracy": {
                "between": "probe_between_accuracy_mean",
                "worst": "probe_worst_accuracy_mean",
            }
        },
    }
    # The first line of a panel is the one drawn against epoch: the mean over all samples.
    panel = figures.panels_of(keys)["sample"]["jacobian_operator_norm_none"]
    assert next(iter(panel)) == "mean"


@pytest.mark.parametrize("n, sizes", [(1, [1]), (12, [12]), (13, [12, 1]), (30, [12, 12, 6])])
def test_no_figure_has_more_than_12_panels(n, sizes, tmp_path):
    by_panel = {f"measure{i:02d}": {"measure": f"measure{i:02d}"} for i in range(n)}
    pages = figures.pages(by_panel)
    assert [len(chunk) for _, chunk in pages] == sizes
    assert [suffix for suffix, _ in pages] == ["", *(f"_{i}" for i in range(2, len(sizes) + 1))]
    assert [key for _, chunk in pages for key, _ in chunk] == list(by_panel)  # each once, in order
    rows = [{"width": w, "train_error": 0.1, **{k: float(w) for k in by_panel}} for w in (1, 2)]
    epochs = [{**row, "epoch": e} for row in rows for e in (0, 1)]
    written = figures.draw_measures(tmp_path, "t", list(by_panel), rows, epochs, [])
    assert sorted(p.name for p in written) == sorted(
        [f"network_measures_vs_{x}{s}.png" for x in ("width", "epoch") for s, _ in pages]
        + ["correlation.png"]
    )


def test_every_line_over_several_seeds_has_its_interval(tmp_path, monkeypatch):
    """Where the rows hold a 95% interval (several seeds), every line of every figure is drawn
    with its band, and every bar of the scores with its interval, which need not hold the bar's
    end (a percentile bootstrap interval)."""
    drawn = {}
    monkeypatch.setattr(
        figures, "save", lambda fig, path: drawn.setdefault(path.name, fig) and path
    )
    keys = [
        "train_jacobian_operator_norm_none_mean",
        "train_jacobian_operator_norm_none_clean_mean",
        "train_jacobian_operator_norm_none_corrupted_mean",
        "hessian_trace",
        "pacbayes_flatness",
        "train_jacobian_operator_norm_none_max",  # with the mean and the bound: the paper's lines
        "lipschitz_upper_bound",
        "probe_worst_accuracy_mean",
        "probe_worst_jacobian_operator_norm_none_mean",
    ]
    opnorm = [f"opnorm_none_{s}" for s in ("mean", "clean_mean", "corrupted_mean")]
    columns = ["train_error", "test_error", *keys, *opnorm]

    def row(**fixed):
        values = {c: 1.0 + fixed.get("width", 1) for c in columns}
        return {
            **fixed,
            **values,
            **{f"{c}_{b}": v for c, v in values.items() for b in ("low", "high")},
        }

    widths = [row(width=w) for w in (1, 2, 4)]
    epochs = [{**row(width=w), "epoch": e} for w in (1, 2, 4) for e in (0, 2)]
    scores = {name: 0.5 for name in figures.SCORED}
    correlation = [
        {"measure": k, **scores, **{f"{n}_{b}": 0.25 for n in scores for b in ("low", "high")}}
        for k in keys
    ]
    assert set(figures.PAPER_LINES.values()) <= set(keys)
    figures.draw_paper(tmp_path, "t", widths, widths)
    figures.draw(tmp_path, "t", ["none"], widths, epochs)
    figures.draw_measures(tmp_path, "t", keys, widths, epochs, correlation)
    figures.draw_smoothness(tmp_path, "t", ["none"], keys, widths)
    # the paper's, error, lipschitz x2, sample x2, network x2, baseline x2, probe, scores,
    # smoothness
    assert len(drawn) == 13
    for name, fig in drawn.items():
        for ax in fig.axes:
            if name == "correlation.png":
                (bars,), (intervals,) = ax.containers, ax.collections
                assert len(bars) == len(intervals.get_segments()) == len(keys) - 1, name  # one of
                # the probe set's operator norm: in smoothness_vs_width.png
                continue
            lines = [ln for ln in ax.get_lines() if ln.get_label() != "interpolation threshold"]
            assert lines and len(ax.collections) == len(lines), (name, ax.get_title())
