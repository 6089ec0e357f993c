"""`lipdd stats` result files read and compared with one process's."""

import json
from pathlib import Path

import pytest


def results(d: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}


RELATED = {"lipschitz_upper_bound_over_max", "lipschitz_upper_bound_softmax_over_max"}


def assert_same_results(got: dict, want: dict, shards: bool = False):
    """Result files equal to one process's; per-network ones exactly (each is computed whole by
    one process), but for the relations to every sample's values, which shards leave out."""
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        if "summary" in w:
            if shards:
                related = set(w["summary"]) - set(g["summary"])
                bound = name.startswith("lipschitz_upper_bound")
                assert related == (RELATED if bound else set()), name
                w = {**w, "summary": {k: v for k, v in w["summary"].items() if k not in related}}
            assert g == w, name
            continue
        for field in ("sample_ids", "targets", "ground_truths", "metadata"):
            assert g[field] == w[field], (name, field)
        assert [v for (v,) in g["stats"]] == pytest.approx([v for (v,) in w["stats"]], rel=1e-6), (
            name
        )
        assert g["batch_means"] == pytest.approx(w["batch_means"], rel=1e-6), name
