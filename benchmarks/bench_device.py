"""A device against its own peaks and against the CPU (benchmarks/gpu_check.sh runs it on a GPU).

- peaks: matmul (4096², or 1024² with --quick) and a 3x3 convolution (batch 64, 128 channels,
  32x32) in IEEE fp32, TF32 and bf16, in TFLOP/s (the median of 10 timed runs after warm-up);
- agreement: per-sample Jacobian operator norms (logits, softmax), the Lipschitz upper bound and
  the Hessian's top eigenvalue of cnn5_8 and resnet18_4 (random weights, 64 CIFAR-shaped inputs),
  computed on the device and on the CPU: the largest relative difference of each;
- curvature: the Hessian's top eigenvalue of resnet18_64 on 32 samples on the device (seconds,
  products, peak memory allocated) and the Lipschitz upper bound of the same network (seconds).

    .venv/bin/python benchmarks/bench_device.py --device cuda [--quick]

With --device cpu (a dry run) the agreement is trivially 0 and the peaks are the CPU's. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lipdd.measures import lipschitz
from lipdd.measures.curvature import Hessian
from lipdd.measures.registry import per_sample
from lipdd.models import build_model
from lipdd.runtime import matmul_precision

PRECISIONS = ("ieee", "tf32", "bf16")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, rounds=10) -> float:
    """Median seconds of fn() over `rounds` after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def with_precision(precision: str, fn):
    """fn(dtype) with float32 products and convolutions in TF32 for "tf32", IEEE otherwise
    (lipdd.runtime.matmul_precision), in bf16 tensors for "bf16"; IEEE again after."""
    matmul_precision("tf32" if precision == "tf32" else "fp32")
    try:
        return fn(torch.bfloat16 if precision == "bf16" else torch.float32)
    finally:
        matmul_precision("fp32")


def peaks(device: torch.device, quick: bool) -> dict[str, float]:
    n = 1024 if quick else 4096
    batch, channels, side = (8, 32, 16) if quick else (64, 128, 32)
    conv_flops = 2 * batch * channels * channels * 9 * side * side
    out = {}
    for precision in PRECISIONS:

        def matmul(dtype):
            a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
            return 2 * n**3 / timed(lambda: a @ b, device) / 1e12

        def conv(dtype):
            x = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
            w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
            return conv_flops / timed(lambda: F.conv2d(x, w, padding=1), device) / 1e12

        out[f"matmul_{precision}_tflops"] = float(f"{with_precision(precision, matmul):.3g}")
        out[f"conv_{precision}_tflops"] = float(f"{with_precision(precision, conv):.3g}")
    return out


def measures(model, x, y, device) -> dict[str, object]:
    """What the agreement compares, computed with `model` and the data on `device`."""
    model, x, y = model.to(device), x.to(device), y.to(device)
    norms = per_sample(model, x, y, ["jacobian_operator_norm"], ["none", "softmax"])
    bound, _ = lipschitz.upper_bound(model, tuple(x.shape[1:]))
    (top,), _ = Hessian(model, x, y).top_eigenvalues(1, 1e-6, seed=0)
    return {
        **{f"opnorm_{n}": v.double().cpu() for (_, n), v in norms.items()},
        "bound": bound,
        "hessian_top": top,
    }


def agreement(device: torch.device) -> dict[str, float]:
    """The largest relative difference, device against CPU, of each measure on each network."""
    out = {}
    for family, width in (("cnn5", 8), ("resnet18", 4)):
        torch.manual_seed(0)
        model = build_model(family, width, 3, 10).eval()
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        cpu = measures(model, x, y, torch.device("cpu"))
        got = measures(model, x, y, device)  # in IEEE fp32, as lipdd stats measures
        for name, want in cpu.items():
            value = got[name]
            if isinstance(want, torch.Tensor):
                diff = ((value - want).abs() / want.abs().clamp_min(1e-30)).max().item()
            else:
                diff = abs(value - want) / abs(want)
            out[f"{family}_{name}_rel_diff"] = float(f"{diff:.3g}")
    return out


def curvature(device: torch.device, quick: bool) -> dict[str, float]:
    width, samples = (8, 8) if quick else (64, 32)
    torch.manual_seed(0)
    model = build_model("resnet18", width, 3, 10).eval().to(device)
    x = torch.randn(samples, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (samples,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    hessian = Hessian(model, x, y)
    (top,), products = hessian.top_eigenvalues(1, 1e-3, seed=0)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    del hessian
    start = time.perf_counter()
    bound, maps = lipschitz.upper_bound(model, (3, 32, 32))
    sync(device)
    return {
        "network": f"resnet18_{width}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "hessian_top_eigenvalue": top,
        "hessian_products": products,
        "hessian_seconds": round(seconds, 2),
        "hessian_peak_mib": peak and round(peak),
        "bound": bound,
        "bound_maps": len(maps),
        "bound_seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    matmul_precision("fp32")
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for name, part in (
        ("peaks", lambda: peaks(device, args.quick)),
        ("agreement", lambda: agreement(device)),
        ("curvature", lambda: curvature(device, args.quick)),
    ):
        out[name] = part()
        print(json.dumps({name: out[name]}), flush=True)  # each part as soon as it is measured
    print(json.dumps(out))


if __name__ == "__main__":
    main()
