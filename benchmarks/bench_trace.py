"""Hessian trace: Hutch++ against Hutchinson at equal numbers of Hessian-vector products, on a
network small enough for its explicit Hessian (cnn5_1 on 500 digits, trained to fit them, 492
parameters), so each estimate's error is known exactly.

Both are lipdd.measures.curvature.Hessian's own (`hutchinson`, `hutchplusplus`), on the same
Hessian-vector products, each budget repeated with seeds 0..R-1. Per budget: the median relative
error of each, the median over seeds of the paired ratio of errors (Hutchinson's over Hutch++'s,
same seed), and the products Hutchinson would need for Hutch++'s median error, from its own error
falling as 1 / sqrt(products).

    .venv/bin/python benchmarks/bench_trace.py [--quick] [--repeats 20]

--quick: two budgets, three repeats (a smoke test). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from lipdd.measures.curvature import Hessian
from lipdd.models import build_model


def fitted_network(points: int = 500, steps: int = 1500):
    """cnn5_1 trained with Adam on the first `points` digits (standardised), float64."""
    digits = load_digits()
    x = torch.tensor(digits.images[:points], dtype=torch.float64)[:, None]
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target[:points])
    torch.manual_seed(0)
    model = build_model("cnn5", 1, 1, 10).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), x, y


def explicit_trace(hessian: Hessian) -> float:
    """tr H from the n products H e_i."""
    eye = torch.eye(hessian.size, dtype=torch.float64)
    return sum(float(hessian.matvec(e)[i]) for i, e in enumerate(eye))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    budgets, repeats = ((12, 30), 3) if args.quick else ((12, 30, 60, 120), args.repeats)
    torch.set_num_threads(1)
    model, x, y = fitted_network(steps=100 if args.quick else 1500)
    hessian = Hessian(model, x, y)
    exact = explicit_trace(hessian)
    rows = []
    for products in budgets:
        started = time.perf_counter()
        errors = np.array(
            [
                [
                    abs(hessian.hutchinson(products, seed)[0].mean() - exact) / abs(exact),
                    abs(hessian.hutchplusplus(products, seed)[0] - exact) / abs(exact),
                ]
                for seed in range(repeats)
            ]
        )
        hutchinson, hutchpp = np.median(errors, 0)
        rows.append(
            {
                "products": products,
                "hutchinson_median_error": float(hutchinson),
                "hutchpp_median_error": float(hutchpp),
                "paired_error_ratio": float(np.median(errors[:, 0] / errors[:, 1])),
                "hutchinson_products_for_hutchpp_error": math.ceil(
                    products * (hutchinson / hutchpp) ** 2
                ),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(rows[-1], flush=True)
    print(
        json.dumps({"parameters": hessian.size, "trace": exact, "repeats": repeats, "rows": rows})
    )


if __name__ == "__main__":
    main()
