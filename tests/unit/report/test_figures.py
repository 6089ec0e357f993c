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
