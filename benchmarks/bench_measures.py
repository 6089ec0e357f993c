"""The per-network measures against other ways to compute them, on the same networks and data.

1. Curvature: time to the top Hessian eigenvalue of the mean cross-entropy at relative tolerance
   1e-3, lipdd's (lipdd.measures.lanczos on lipdd.measures.curvature's Hessian-vector products)
   against PyHessian
   0.1's power iteration (`pip install pyhessian==0.1`; skipped without it), cnn5 and resnet18 at
   widths 8 and 32, CIFAR-shaped inputs; paired rounds, median ratio. PyHessian's `tol` bounds the
   relative change between two iterations, not the error, so its answer at tol=1e-3 can be off by
   more than 1e-3: each value's error against a 1e-10 Lanczos reference is printed, and a second
   ratio times PyHessian at the first of tol = 1e-3, 1e-4, 1e-5, 1e-6 (maxIter 1000) whose answer
   is within 1e-3 of the reference (`curvature_vs_pyhessian_same_accuracy`).
2. Upper bound: lipdd.measures.lipschitz against the explicit sparse-matrix method (each map's
   matrix built entry by entry as a scipy.sparse matrix, as Khromov & Singh do, its norm by svds):
   time and relative difference of the bounds.
3. Accuracy against float64 references on a tiny cnn5: Hessian eigenvalue against the explicit
   Hessian's, the bound against dense SVDs of every map.
4. Probe sets: time per point of the per-sample measures on a probe set's points (between, 1-pixel
   shifts) over their time per point on the training points they come from, cnn5 width 8 on
   CIFAR-shaped inputs: probes go through the same per-sample path, so about 1
   (`probe_vs_training_points`, the largest of the medians of paired rounds).

    .venv/bin/python benchmarks/bench_measures.py [--quick] [--part curvature bound accuracy probes]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import statistics
import time

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.sparse.linalg import svds

from lipdd import config
from lipdd.measures import curvature, lipschitz
from lipdd.measures.probes import PROBES, Points
from lipdd.models import CNN5, build_model
from lipdd.stats.compute import measure_points

TOL = 1e-3


def ours_top_eigenvalue(model, x, y, tol=TOL):
    return curvature.Hessian(model, x, y).top_eigenvalues(1, tol, seed=0)[0][0]


def pyhessian_top_eigenvalue(model, x, y, tol=TOL, max_iter=100):
    from pyhessian import hessian

    torch.manual_seed(1)  # PyHessian draws its start vector from torch's generator
    h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    return float(h.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)[0][0])


def pyhessian_time_to_accuracy(model, x, y, reference) -> float:
    for tol in (1e-3, 1e-4, 1e-5, 1e-6):
        start = time.perf_counter()
        value = pyhessian_top_eigenvalue(model, x, y, tol, max_iter=1000)
        if abs(value - reference) <= TOL * abs(reference):
            return time.perf_counter() - start
    return math.inf


def bench_curvature(quick: bool) -> dict:
    if importlib.util.find_spec("pyhessian") is None:
        print("pyhessian not installed: `pip install pyhessian==0.1`; curvature comparison skipped")
        return {}
    out, ratios, accurate_ratios = {}, [], []
    configs = (
        [("cnn5", 8)] if quick else [("cnn5", 8), ("cnn5", 32), ("resnet18", 8), ("resnet18", 32)]
    )
    for family, width in configs:
        torch.manual_seed(0)
        model = build_model(family, width, 3, 10).eval()
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        pairs = []
        for _ in range(1 if quick else 3):
            start = time.perf_counter()
            theirs = pyhessian_top_eigenvalue(model, x, y)
            mid = time.perf_counter()
            ours = ours_top_eigenvalue(model, x, y)
            pairs.append((mid - start) / (time.perf_counter() - mid))
        ratio = statistics.median(pairs)
        reference = ours_top_eigenvalue(model, x, y, tol=1e-10)
        theirs_time = pyhessian_time_to_accuracy(model, x, y, reference)
        start = time.perf_counter()  # ours again, right after: a pair under the same load
        ours_top_eigenvalue(model, x, y)
        accurate = theirs_time / (time.perf_counter() - start)
        ratios.append(ratio)
        accurate_ratios.append(accurate)
        error = {
            "ours": abs(ours - reference) / reference,
            "pyhessian": abs(theirs - reference) / reference,
        }
        print(
            f"{family}_{width}: top eigenvalue {reference:.8g}; at tol 1e-3 ours {ours:.8g} (rel. "
            f"error {error['ours']:.1e}), PyHessian {theirs:.8g} ({error['pyhessian']:.1e}); "
            f"PyHessian time / ours {ratio:.2f} at the same tol, {accurate:.2f} at the same "
            "accuracy"
        )
        out[f"curvature_{family}_{width}"] = {
            "reference": reference,
            "rel_error": error,
            "time_ratio": round(ratio, 3),
            "time_ratio_same_accuracy": round(accurate, 3),
        }
    out["curvature_vs_pyhessian"] = round(min(ratios), 3)
    out["curvature_vs_pyhessian_same_accuracy"] = round(min(accurate_ratios), 3)
    return out


# ------------------------------------------------------------------------- explicit sparse matrices


def conv_matrix(conv: nn.Conv2d, shape) -> sp.csr_matrix:
    """The convolution's linear part on inputs of `shape` (C, H, W), entry by entry."""
    c, h, w = shape
    weight = conv.weight.detach().double().numpy()
    cout, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = conv.stride, conv.padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    o, ci, ki, kj, i, j = np.meshgrid(
        np.arange(cout),
        np.arange(c),
        np.arange(kh),
        np.arange(kw),
        np.arange(oh),
        np.arange(ow),
        indexing="ij",
    )
    r, s = i * sh - ph + ki, j * sw - pw + kj
    keep = (r >= 0) & (r < h) & (s >= 0) & (s < w)
    rows = ((o * oh + i) * ow + j)[keep]
    cols = ((ci * h + r) * w + s)[keep]
    return sp.csr_matrix(
        (weight[o, ci, ki, kj][keep], (rows, cols)), shape=(cout * oh * ow, c * h * w)
    )


def pool_matrix(shape, k) -> sp.csr_matrix:
    """Average pooling with a k x k window and stride k (global pooling: k = H)."""
    c, h, w = shape
    oh, ow = h // k, w // k
    ch, i, j, a, b = np.meshgrid(
        np.arange(c), np.arange(oh), np.arange(ow), np.arange(k), np.arange(k), indexing="ij"
    )
    rows = ((ch * oh + i) * ow + j).ravel()
    cols = ((ch * h + i * k + a) * w + j * k + b).ravel()
    return sp.csr_matrix(
        (np.full(rows.size, 1 / k**2), (rows, cols)), shape=(c * oh * ow, c * h * w)
    )


def sparse_norm(m: sp.spmatrix) -> float:
    if min(m.shape) <= 2 or m.shape[1] <= 1024:  # small: a dense SVD, the float64 reference
        return float(np.linalg.norm(m.toarray(), 2))
    return float(
        svds(m, k=1, return_singular_vectors=False, tol=1e-10, v0=np.ones(min(m.shape)))[0]
    )


def sparse_bound(model, shape) -> float:
    """lipdd's bound, every map as an explicit sparse matrix (no batch norm: plain networks)."""
    if isinstance(model, CNN5):
        bound, s = 1.0, shape
        for layer, pool_before in (
            (model.layer1, False),
            (model.layer2, False),
            (model.layer3, True),
            (model.layer4, True),
        ):
            pool = sp.identity(math.prod(s), format="csr")
            if pool_before:  # a ReLU, then pooling, then this convolution: one linear map
                pool, s = pool_matrix(s, 2), (s[0], s[1] // 2, s[2] // 2)
            bound *= sparse_norm(conv_matrix(layer.conv, s) @ pool)
            s = (layer.conv.out_channels, s[1], s[2])
        head = sp.csr_matrix(model.fc.weight.detach().double().numpy()) @ pool_matrix(s, s[1])
        return bound * sparse_norm(head)
    bound, s = sparse_norm(conv_matrix(model.conv1, shape)), (model.conv1.out_channels, *shape[1:])
    for stage in model.stages():
        for block in stage:
            first = conv_matrix(block.conv1, s)
            out = (
                block.conv1.out_channels,
                (s[1] - 1) // block.conv1.stride[0] + 1,
                (s[2] - 1) // block.conv1.stride[1] + 1,
            )
            second = conv_matrix(block.conv2, out)
            shortcut = (
                1.0
                if block.downsample is None
                else sparse_norm(conv_matrix(block.downsample[0], s))
            )
            bound *= shortcut + sparse_norm(first) * sparse_norm(second)
            s = out
    head = sp.csr_matrix(model.fc.weight.detach().double().numpy()) @ pool_matrix(s, s[1])
    return bound * sparse_norm(head)


def bench_upper_bound(quick: bool) -> dict:
    out, ratios, errors = {}, [], []
    configs = (
        [("cnn5", 8)] if quick else [("cnn5", 8), ("cnn5", 32), ("resnet18", 8), ("resnet18", 32)]
    )
    for family, width in configs:
        torch.manual_seed(0)
        model = build_model(family, width, 3, 10).eval()
        pairs = []
        for _ in range(1 if quick else 3):
            start = time.perf_counter()
            theirs = sparse_bound(model, (3, 32, 32))
            mid = time.perf_counter()
            ours, _ = lipschitz.upper_bound(model, (3, 32, 32))
            pairs.append((mid - start) / (time.perf_counter() - mid))
        ratio = statistics.median(pairs)
        error = abs(ours - theirs) / theirs
        ratios.append(ratio)
        errors.append(error)
        print(
            f"{family}_{width}: bound ours {ours:.8g}, sparse {theirs:.8g} (rel. diff "
            f"{error:.1e}); sparse time / ours {ratio:.2f}"
        )
        out[f"upper_bound_{family}_{width}"] = {
            "ours": ours,
            "sparse": theirs,
            "time_ratio": round(ratio, 3),
        }
    out["upper_bound_vs_sparse"] = round(min(ratios), 3)
    out["upper_bound_rel_diff"] = max(errors)
    return out


def bench_accuracy() -> float:
    """Largest relative error of the measures against float64 references on a tiny cnn5."""
    torch.manual_seed(0)
    model = build_model("cnn5", 1, 1, 10).double().eval()
    x, y = torch.randn(100, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (100,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(theta):
        params = dict(
            zip(
                names,
                (
                    t.view(s)
                    for t, s in zip(torch.split(theta, [math.prod(s) for s in shapes]), shapes)
                ),
            )
        )
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    exact_top = torch.linalg.eigvalsh(torch.func.jacrev(torch.func.jacrev(loss))(flat))[-1].item()
    ours = ours_top_eigenvalue(model, x, y, tol=1e-10)
    errors = {"hessian_top_eigenvalue": abs(ours - exact_top) / abs(exact_top)}
    bound, _ = lipschitz.upper_bound(model, (1, 8, 8))
    dense = sparse_bound(copy.deepcopy(model), (1, 8, 8))  # every map's explicit matrix, dense SVD
    errors["lipschitz_upper_bound"] = abs(bound - dense) / dense
    for k, v in errors.items():
        print(f"accuracy: {k} relative error {v:.1e}")
    return max(errors.values())


def bench_probes(quick: bool) -> dict:
    torch.manual_seed(0)
    model = build_model("cnn5", 8, 3, 10).eval()
    n = 32 if quick else 128
    points = Points(
        torch.randn(n, 3, 32, 32),
        torch.randint(0, 10, (n,)),
        np.arange(n),
        np.zeros(n, bool),
        [0.5] * 3,
        [0.25] * 3,
        10,
    )
    options = config.build(
        {
            "stats.metric": ["jacobian_operator_norm"],
            "stats.normalization": ["none", "softmax"],
            "stats.batch_size": 64,
            "stats.probe_lambdas": [0.5],
            "stats.probe_directions": 1,
        },
        environ={},
    ).stats
    out = {}
    for name in ("between", "shift1"):
        probe = PROBES[name](points, options)
        pairs = []
        for _ in range(1 if quick else 5):
            start = time.perf_counter()
            measure_points(model, points.x, points.targets, options)
            mid = time.perf_counter()
            measure_points(model, probe.x, probe.targets, options)
            per_probe_point = (time.perf_counter() - mid) / len(probe.targets)
            pairs.append(per_probe_point / ((mid - start) / n))
        out[name] = round(statistics.median(pairs), 3)
        print(
            f"probe {name}: {len(probe.targets)} points; time per point over the training points' "
            f"{out[name]:.2f}"
        )
    return {"probe_vs_training_points": max(out.values()), "probes": out}


PARTS = {
    "curvature": bench_curvature,
    "bound": bench_upper_bound,
    "accuracy": lambda quick: {"max_rel_err": bench_accuracy()},
    "probes": bench_probes,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small network each, one round")
    parser.add_argument(
        "--part", nargs="+", choices=PARTS, default=list(PARTS), help="what to run (default: all)"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {}
    for part in args.part:
        result.update(PARTS[part](args.quick))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
