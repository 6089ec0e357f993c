"""Memory of the Hessian's top eigenvalue on resnet18_64 (11.2 M parameters) on the CPU:
lipdd.measures.curvature's Hessian-vector products and lipdd.measures.lanczos with the basis
bounded by stats.curvature_memory, against the same Lanczos with an unbounded basis, each in a
process of its own (peak RSS is per process).

Per run: the parameters, one basis vector's MB, the budget and the vectors it holds, the products
taken, the eigenvalue, seconds, the resident memory once the gradient's graph is built (model,
data, graph: what any method needs), the peak over two Hessian-vector products alone (the
product's own temporaries), the peak during Lanczos, and Lanczos's excess over the products'
peak (its basis and vectors). `bounded_vs_unbounded_excess` is the ratio of the two excesses;
`excess_within_budget` whether the bounded excess stays within the budget plus three vectors
(the recurrence's vector, the restart's Ritz combination and one block's rounding).

    .venv/bin/python benchmarks/bench_curvature_memory.py [--quick] [--samples 32] [--budget 512]

--quick: resnet18_8, 8 samples (a smoke test). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def one_run(width: int, samples: int, budget_mib: int, tol: float) -> dict:
    import torch

    from lipdd.measures.curvature import Hessian
    from lipdd.models import build_model

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model("resnet18", width, 3, 10).eval()
    x, y = torch.randn(samples, 3, 32, 32), torch.randint(0, 10, (samples,))
    hessian = Hessian(model, x, y)
    graph = rss_mb()
    v = torch.randn(hessian.size, dtype=torch.float64)
    for _ in range(2):
        hessian.matvec(v)
    del v
    products_peak = peak_rss_mb()
    start = time.perf_counter()
    memory = budget_mib << 20 if budget_mib else None
    values, products = hessian.top_eigenvalues(1, tol, seed=0, memory=memory)
    seconds = time.perf_counter() - start
    vector_mb = hessian.size * 8 / 2**20
    peak = peak_rss_mb()
    return dict(
        parameters=hessian.size,
        vector_mb=round(vector_mb, 1),
        budget_mib=budget_mib or None,
        basis_vectors=(budget_mib << 20) // (hessian.size * 8) if budget_mib else None,
        products=products,
        top_eigenvalue=values[0],
        seconds=round(seconds, 1),
        rss_with_graph_mb=round(graph),
        products_peak_rss_mb=round(products_peak),
        peak_rss_mb=round(peak),
        excess_mb=round(peak - products_peak),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--budget", type=int, default=512, help="MiB for the bounded basis")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: its budget (0: none)
    args = parser.parse_args()
    width, samples = (8, 8) if args.quick else (64, args.samples)
    if args.one is not None:
        print(json.dumps(one_run(width, samples, args.one, args.tol)))
        return
    runs = {}
    for name, budget in (("bounded", args.budget), ("unbounded", 0)):
        command = [sys.executable, __file__, "--one", str(budget), "--tol", str(args.tol)]
        command += ["--samples", str(samples)] + (["--quick"] if args.quick else [])
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs[name] = json.loads(out.splitlines()[-1])
        print(name, runs[name], file=sys.stderr)
    bounded, unbounded = runs["bounded"], runs["unbounded"]
    print(
        json.dumps(
            dict(
                model=f"resnet18_{width}",
                samples=samples,
                **runs,
                bounded_vs_unbounded_excess=round(
                    bounded["excess_mb"] / max(unbounded["excess_mb"], 1), 3
                ),
                excess_within_budget=bounded["excess_mb"] <= args.budget + 3 * bounded["vector_mb"],
                same_eigenvalue_within_tol=abs(
                    bounded["top_eigenvalue"] - unbounded["top_eigenvalue"]
                )
                <= 2 * args.tol * abs(unbounded["top_eigenvalue"]),
            )
        )
    )


if __name__ == "__main__":
    main()
