"""The package's import graph, read from the source with `ast` (every import, a function's own
included): no cycle, and no module imports one of a higher layer. Run by hand to see the graph:
`python tests/unit/test_layers.py` prints each module's lipdd imports."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# Bottom to top: a module may import only modules of its own or a lower layer (and no cycle).
LAYERS = [
    {"errors", "names", "files", "leases", "distributed"},  # foundations: no lipdd import
    {"config", "upstream", "runtime", "models"},  # what a run is, where it runs, its network
    {"data.sources", "data.prepared", "data.loader", "data"}  # the data, and the numerics
    | {"measures.lanczos", "measures.jacobian", "measures.lipschitz", "measures.curvature"}
    | {"measures.baselines"},
    {"measures.registry", "measures.probes", "measures"}  # what stats measures; MLflow
    | {"tracking.store", "tracking.checkpoints", "tracking.sender", "tracking"},
    {"runs"},  # a training run's life in MLflow
    {"train", "stats.writer", "stats.shards", "stats.compute", "stats"}  # the stages
    | {"report.scores", "report.tables", "report.figures", "report.page", "report"}
    | {"upstream_runs", "sweep"},
    {"cli", "__main__"},
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def modules() -> dict[str, Path]:
    root = SRC / "lipdd"
    found = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name:  # the package's own __init__ imports nothing
            found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The lipdd modules `name` imports; `from X import y` counts as X.y where that is a module."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [
                a.name.removeprefix("lipdd.") for a in node.names if a.name.startswith("lipdd.")
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("lipdd"):
                base = node.module.removeprefix("lipdd").removeprefix(".")
            else:
                continue
            targets = [f"{base}.{a.name}".strip(".") for a in node.names]
            targets = [t if t in known else base for t in targets]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_module_has_a_layer():
    assert set(graph()) == set(LAYER), set(graph()) ^ set(LAYER)


def test_no_module_imports_a_higher_layer():
    upward = [(m, t) for m, ts in graph().items() for t in ts if LAYER[t] > LAYER[m]]
    assert upward == []


def test_no_import_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(path[path.index(t) :] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_walk_sees_a_function_level_import(tmp_path):
    """A lazy import counts: the old config -> measures cycle was one."""
    path = tmp_path / "config.py"
    path.write_text("def f():\n    from .measures import MEASURES\n")
    assert imports("config", path, {"config", "measures"}) == {"measures"}


if __name__ == "__main__":
    for m, ts in sorted(graph().items(), key=lambda kv: (LAYER.get(kv[0], 99), kv[0])):
        print(f"{LAYER.get(m, '?')} {m:24} -> {', '.join(sorted(ts))}")
