"""Jacobian statistics: lipdd.measures.jacobian against upstream's two algorithms, re-implemented
here.

    .venv/bin/python benchmarks/bench_stats.py [--device cpu|cuda] [--quick]

For cnn5 and resnet18 at widths 16 and 64 (random init, K = 10 classes, CIFAR-shaped 3x32x32 inputs)
it measures per-sample operator norms of the logit Jacobian, computed by
  upstream_lowmem  upstream's default: one forward pass, then K backward passes on the retained
                   graph, each with a one-hot cotangent, filling an (N, D, K) Jacobian, then
                   batched power iteration;
  upstream_bigmem  upstream's --bigmem: the input tiled K times, one backward with an identity
                   cotangent;
  upstream_frozen  upstream_lowmem with the parameters frozen (upstream calls logits.backward(),
                   so its backward passes also build parameter gradients; this row shows how much
                   of our gain is that);
  ours             lipdd.measures.per_sample, bigmem=False (the default);
  ours_bigmem      lipdd.measures.per_sample, bigmem=True.
Upstream's power iteration: 10 steps from a random start, a sample stops once its estimate changes
by less than 1e-2 (absolute), and its estimate stays at 0 if the first step is already below that.

On CPU the process first calls lipdd.runtime.retain_freed_memory, as lipdd stats does: every method
runs with malloc keeping freed memory.

Timing: all methods of a configuration in one process, round-robin, several rounds; each ratio is
the median over rounds of the per-round ratio, so load from other jobs hits both sides of a ratio
alike. Peak memory: one more call per method under torch.profiler with profile_memory, which records
every allocation and free of torch's CPU allocator (oneDNN's buffers go through it too); the peak is
the largest running sum of those events, i.e. the bytes live at the worst moment of the call beyond
those live when it started. The profiler sees only its own thread's allocations, so these calls run
on one thread, and ours (which runs one chunk per thread at once) is charged threads x its
one-thread peak. (ru_maxrss in fresh subprocesses was tried first and dropped: under memory pressure
from other jobs the kernel evicts the child's mapped torch libraries, so the resident size before
the call fell below the import-time peak and every method showed the same number.) On CUDA:
torch.cuda.max_memory_allocated minus the memory allocated before the call. Accuracy: against
float64 singular values of a float64 Jacobian (K plain backward passes on a float64 copy of the
network), for the networks as initialised (operator norms ~1e-3) and with the last layer scaled so
that the median norm is 10, the size seen on trained networks (the Jacobian scales exactly with the
last layer). The float64 network can sit in another linear piece than an fp32 forward pass (a relu
whose input is ~1e-8 from zero), where the Jacobian itself differs, so our estimates are compared
with the float64 Jacobian of the linear piece our own fp32 pass took (its relu pattern recorded and
replayed): that isolates the arithmetic of our Jacobian and norm. The comparison with the float64
network is printed too. On CUDA the error and speed of precision="tf32" and "bf16" (a CUDA-only
option of lipdd.measures.jacobian; fp32 is IEEE there too) are printed as well: keep one only within
1e-3.

The last line printed is one JSON object: the worst case over configurations of
  vs_upstream_lowmem            samples/s of ours over upstream_lowmem
  vs_upstream_bigmem            samples/s of ours_bigmem over upstream_bigmem
  peak_mem_vs_upstream_bigmem   peak memory of ours and of ours_bigmem (the larger) over
  upstream_bigmem
  max_rel_err               max |ours - exact| / exact, both our paths, fp32, same linear piece
and, for information, max_rel_err_vs_float64_net, vs_upstream_frozen, and upstream estimator's worst
relative error and count of zero estimates. For cnn5_64 and resnet18_64, the scale of a checkpoint:
<model>_samples_per_s (ours), <model>_tflops (those samples/s times the FLOPs of one forward and K
backward passes to the input, counted by FlopCounterMode), <model>_of_conv_peak (over
conv_ieee_peak_tflops, bench_device's IEEE fp32 convolution peak on this device),
<model>_vs_forward_k_backward (ours over upstream_frozen, which does exactly that work) and
<model>_s_per_49000 (seconds for 49,000 samples, one CIFAR-10 checkpoint's). On CUDA also
tf32_/bf16_max_rel_err and _min_speedup, and best_chunk_cuda: the
lipdd.measures.jacobian.CHUNK["cuda"] fastest on cnn5_64 and resnet18_64 (chunk_sweep).
"""

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from bench_device import peaks
from lipdd.measures import per_sample
from lipdd.models import build_model

K = 10
SHAPE = (3, 32, 32)
CONFIGS = [("cnn5", 16), ("cnn5", 64), ("resnet18", 16), ("resnet18", 64)]
METHODS = ("upstream_lowmem", "upstream_bigmem", "upstream_frozen", "ours", "ours_bigmem")
MEM_METHODS = ("upstream_lowmem", "upstream_bigmem", "ours", "ours_bigmem")


# ---------------------------------------------------------------------------- upstream's algorithms


def upstream_jacobian_lowmem(model, x):
    """(N, D, K): one forward pass, K backward passes with one-hot cotangents on the retained
    graph."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    J = torch.zeros(*x.shape, K, dtype=x.dtype, device=x.device)
    onehot = torch.zeros_like(logits)
    for k in range(K):
        onehot.zero_()
        onehot[:, k] = 1
        logits.backward(
            gradient=onehot, retain_graph=True
        )  # parameters get gradients too, as in upstream
        J[..., k] = x.grad
        x.grad.zero_()
    model.zero_grad(set_to_none=True)
    return J.flatten(1, -2)


def upstream_jacobian_bigmem(model, x):
    """(N, D, K): the input tiled K times, one forward and one backward with an identity
    cotangent."""
    n = len(x)
    tiled = x.repeat_interleave(K, dim=0).requires_grad_(True)  # sample i, output k at row i*K + k
    logits = model(tiled)
    logits.backward(gradient=torch.eye(K, dtype=x.dtype, device=x.device).repeat(n, 1))
    model.zero_grad(set_to_none=True)
    return tiled.grad.view(n, K, -1).transpose(1, 2)


def upstream_operator_norm(J, steps=10, atol=1e-2, seed=0):
    """(N,) batched power iteration on (N, D, K); a sample stops once its estimate moves by <
    atol."""
    n = len(J)
    g = torch.Generator(device=J.device).manual_seed(seed)
    sigma = torch.zeros(n, dtype=J.dtype, device=J.device)
    active = torch.arange(n, device=J.device)
    v = torch.randn(n, J.shape[2], 1, generator=g, dtype=J.dtype, device=J.device)
    v = v / v.norm(dim=1, keepdim=True)
    for _ in range(steps):
        u = J @ v
        u = u / u.norm(dim=1, keepdim=True)
        v = J.mT @ u
        v = v / v.norm(dim=1, keepdim=True)
        estimate = (u.mT @ J @ v).flatten()
        moved = (estimate - sigma[active]).abs() >= atol
        if not moved.any():
            break
        sigma[active[moved]] = estimate[moved]
        active, v, J = active[moved], v[moved], J[moved]
    return sigma


# ----------------------------------------------------------------------------- the measured calls


def make_case(family, width, n, device):
    torch.manual_seed(0)
    model = build_model(family, width, SHAPE[0], K).to(device).eval()
    x = torch.randn(n, *SHAPE, device=device)
    targets = torch.randint(0, K, (n,), device=device)
    return model, x, targets


def run_method(name, models, x, targets, precision="fp32"):
    """(N,) operator norms by method `name`; models = (as given, with frozen parameters)."""
    model, frozen = models
    if name == "upstream_lowmem":
        return upstream_operator_norm(upstream_jacobian_lowmem(model, x))
    if name == "upstream_bigmem":
        return upstream_operator_norm(upstream_jacobian_bigmem(model, x))
    if name == "upstream_frozen":
        return upstream_operator_norm(upstream_jacobian_lowmem(frozen, x))
    key = ("jacobian_operator_norm", "none")
    return per_sample(
        model, x, targets, key[:1], key[1:], bigmem=name == "ours_bigmem", precision=precision
    )[key]


def frozen_copy(model):
    frozen = copy.deepcopy(model)
    frozen.requires_grad_(False)
    return frozen


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_methods(models, x, targets, rounds, device):
    """{method: [seconds per round]}, round-robin, after one warm-up call each on a small batch."""
    for name in METHODS:
        run_method(name, models, x[:4], targets[:4])
    times = {name: [] for name in METHODS}
    for _ in range(rounds):
        for name in METHODS:
            sync(device)
            t = time.perf_counter()
            run_method(name, models, x, targets)
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def paired_ratio(slow, fast):
    return statistics.median(s / f for s, f in zip(slow, fast))


def jacobian_work(frozen, x) -> float:
    """FLOPs per sample of one forward pass and K backward passes to the input (torch's
    FlopCounterMode: matmuls and convolutions), the least work a full Jacobian takes that way."""
    x = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        out = frozen(x)
        for k in range(out.shape[1]):  # backward(), not autograd.grad(): the counter's module
            out[:, k].sum().backward(retain_graph=True)  # hooks refuse the latter
    return counter.get_total_flops() / len(x)


# ----------------------------------------------------------------------------- exactness


class ReluPattern(TorchFunctionMode):
    """Inside it every relu either records which of its inputs are positive (no masks given) or,
    given masks recorded before, multiplies its input by the next one: the network restricted to one
    linear piece. (cnn5 and resnet18 are piecewise linear: convolutions, average pooling, relu,
    linear.)"""

    RELUS = (F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)

    def __init__(self, masks=None):
        super().__init__()
        self.recording, self.masks = masks is None, [] if masks is None else list(masks)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.RELUS:
            if not self.recording:
                return args[0] * self.masks.pop(0).to(args[0].dtype)
            self.masks.append(args[0].detach() > 0)
        return func(*args, **(kwargs or {}))


def norms64(model, x, masks=None):
    """(N,) float64 largest singular values of float64 Jacobians (plain autograd, K backward
    passes), and the relu pattern of that float64 forward pass; on the linear piece `masks` if
    given."""
    model64 = frozen_copy(model).double()
    x = x.double().requires_grad_(True)
    with ReluPattern(masks) as pattern:
        logits = model64(x)
    eye = torch.eye(K, dtype=x.dtype, device=x.device)
    rows = [
        torch.autograd.grad(logits, x, eye[k].expand_as(logits), retain_graph=k < K - 1)[0].flatten(
            1
        )
        for k in range(K)
    ]
    return torch.linalg.svdvals(torch.stack(rows, 1))[:, 0], pattern.masks


def ours_with_pattern(name, model, x, targets):
    """Our estimates and the relu pattern of our own forward pass(es), chunks joined along the
    batch. One thread, so the chunks run one after another where ReluPattern (a thread-local mode)
    sees them; tests/unit/measures/test_jacobian.py checks that concurrent chunks give the same
    values."""
    with ReluPattern() as one, torch.no_grad():
        model(x[:1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ReluPattern() as rec:
            estimate = run_method(name, (model, None), x, targets)
    finally:
        torch.set_num_threads(threads)
    per_forward = len(one.masks)
    return estimate, [torch.cat(rec.masks[r::per_forward]) for r in range(per_forward)]


def rel_err(estimate, exact):
    return ((estimate.double() - exact).abs() / exact).max().item()


def accuracy(model, x, targets, upstream_jacobian):
    """Relative errors of both our paths and of upstream estimator, as initialised and rescaled to
    ~10.

    Our fp32 estimates are compared with float64 singular values of the float64 Jacobian of the same
    linear piece as our fp32 forward pass (its relu pattern replayed), which measures the arithmetic
    of our Jacobian and norm; and, for information, with those of the float64 network, whose relu
    pattern can differ from any fp32 forward pass in a unit or two whose input is ~1e-8 from zero:
    the Jacobian then genuinely differs (a 1e-5 input perturbation moves resnet18's by ~1%)."""
    net, net_masks = norms64(model, x)
    scale = 10 / net.median().item()
    scaled = copy.deepcopy(model)
    last = [m for m in scaled.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(scale)  # after the last relu: the same pieces, the Jacobian times `scale`
    pieces = []  # (masks, float64 norms) already computed
    out = {}
    for label, m, c in (("init", model, 1.0), ("x10", scaled, scale)):
        e = dict(median_norm=net.median().item() * c, ours=0.0, ours_net=0.0, other_piece=0)
        for name in ("ours", "ours_bigmem"):
            estimate, masks = ours_with_pattern(name, m, x, targets)
            known = [n for ms, n in pieces if all(torch.equal(a, b) for a, b in zip(ms, masks))]
            if not known:
                known = [norms64(model, x, masks)[0]]
                pieces.append((masks, known[0]))
            e["ours"] = max(e["ours"], rel_err(estimate, known[0] * c))
            e["ours_net"] = max(e["ours_net"], rel_err(estimate, net * c))
            differs = torch.stack(
                [(a != b).flatten(1).any(1) for a, b in zip(masks, net_masks)]
            ).any(0)
            e["other_piece"] = max(e["other_piece"], int(differs.sum()))
        # upstream's Jacobian of the scaled net, up to rounding
        theirs = upstream_operator_norm(upstream_jacobian * c)
        e.update(upstream=rel_err(theirs, net * c), upstream_zeros=int((theirs == 0).sum()))
        out[label] = e
    return out


def reduced_precision(model, x, targets, device):
    """CUDA only: {precision: (max relative error against the float64 network, speed-up over
    fp32)}."""
    net = norms64(model, x)[0]
    out, fp32_seconds = {}, None
    for precision in ("fp32", "tf32", "bf16"):
        run_method("ours", (model, None), x, targets, precision)  # warm-up
        sync(device)
        start = time.perf_counter()
        estimate = run_method("ours", (model, None), x, targets, precision)
        sync(device)
        seconds = time.perf_counter() - start
        fp32_seconds = fp32_seconds or seconds
        out[precision] = (rel_err(estimate, net), fp32_seconds / seconds)
    return out


def chunk_sweep(device, sizes=(64, 128, 256, 512, 1024), n=1024, rounds=3):
    """CUDA only: samples/s of ours for each lipdd.measures.jacobian.CHUNK["cuda"], on the widest
    networks; returns the chunk whose worst speed over the networks, relative to each network's
    best, is highest."""
    from lipdd.measures import jacobian

    saved, speeds = jacobian.CHUNK["cuda"], {}
    try:
        for family in ("cnn5", "resnet18"):
            model, x, targets = make_case(family, 64, n, device)
            for size in sizes:
                jacobian.CHUNK["cuda"] = size
                run_method("ours", (model, None), x, targets)  # warm-up
                times = []
                for _ in range(rounds):
                    sync(device)
                    start = time.perf_counter()
                    run_method("ours", (model, None), x, targets)
                    sync(device)
                    times.append(time.perf_counter() - start)
                speeds[family, size] = n / statistics.median(times)
    finally:
        jacobian.CHUNK["cuda"] = saved
    print("\nCUDA, samples/s of ours by jacobian.CHUNK['cuda'], width 64, 1,024 samples")
    for family in ("cnn5", "resnet18"):
        print(f"{family:12} " + "  ".join(f"{size}: {speeds[family, size]:.0f}" for size in sizes))
    best = {f: max(speeds[f, s] for s in sizes) for f in ("cnn5", "resnet18")}
    return max(sizes, key=lambda s: min(speeds[f, s] / best[f] for f in best))


# ----------------------------------------------------------------------------- peak memory


def peak_memory(name, models, x, targets, device):
    """Bytes allocated at the peak of one call above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_method(name, models, x, targets)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # Every allocation and free of torch's CPU allocator (oneDNN's buffers included: PyTorch hands
    # oneDNN that allocator), in time order; the peak is the largest running sum. The profiler sees
    # the allocations of its own thread only (pytorch/pytorch#192290), so the call runs on one
    # thread; with T threads ours runs up to T chunks at once, so its figure is T times the
    # one-thread peak, a bound (the one-thread peak also holds the finished chunks' results, which
    # are not repeated).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            run_method(name, models, x, targets)
    finally:
        torch.set_num_threads(threads)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak * (threads if name == "ours" else 1)


# ----------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--quick", action="store_true", help="fewer samples and rounds, no upstream_frozen memory"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        from lipdd.runtime import retain_freed_memory

        retain_freed_memory()
    print(
        f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, K={K}, "
        f"input {SHAPE}"
    )
    header = (
        f"{'model':12} {'N':>3} "
        + " ".join(f"{m:>12}" for m in METHODS)
        + f" {'vs_low':>7} {'vs_big':>7} {'vs_frz':>7}"
    )
    print("\nsamples/s (median over rounds); ratios: median of per-round ratios ours/upstream")
    print(header)
    rows, mems, errs, reduced, work = [], {}, {}, {}, {}
    for family, width in CONFIGS:
        n = (16 if width == 64 else 32) if args.quick else (32 if width == 64 else 64)
        rounds = 2 if args.quick else (3 if width == 64 else 5)
        model, x, targets = make_case(family, width, n, device)
        models = (model, frozen_copy(model))
        times = time_methods(models, x, targets, rounds, device)
        row = dict(
            model=f"{family}_{width}",
            n=n,
            vs_low=paired_ratio(times["upstream_lowmem"], times["ours"]),
            vs_big=paired_ratio(times["upstream_bigmem"], times["ours_bigmem"]),
            vs_frozen=paired_ratio(times["upstream_frozen"], times["ours"]),
        )
        rows.append(row)
        print(
            f"{row['model']:12} {n:>3} "
            + " ".join(f"{n / statistics.median(times[m]):>12.1f}" for m in METHODS)
            + f" {row['vs_low']:>7.2f} {row['vs_big']:>7.2f} {row['vs_frozen']:>7.2f}",
            flush=True,
        )
        if width == 64:
            rate = n / statistics.median(times["ours"])
            work[row["model"]] = (rate, rate * jacobian_work(models[1], x) / 1e12, row["vs_frozen"])
        errs[row["model"]] = accuracy(model, x, targets, upstream_jacobian_lowmem(model, x))
        if device.type == "cuda":
            reduced[row["model"]] = reduced_precision(model, x, targets, device)
        mems[row["model"]] = {
            m: peak_memory(m, models, x, targets, device)
            for m in MEM_METHODS
            if not (args.quick and m == "upstream_lowmem")
        }

    print("\npeak memory, MiB allocated above the allocation at the start of the call")
    print(f"{'model':12} " + " ".join(f"{m:>12}" for m in MEM_METHODS) + f" {'vs_big':>7}")
    mem_ratios = []
    for name, mem in mems.items():
        ratio = max(mem["ours"], mem["ours_bigmem"]) / mem["upstream_bigmem"]
        mem_ratios.append(ratio)
        print(
            f"{name:12} "
            + " ".join(
                f"{mem[m] / 2**20:>12.1f}" if m in mem else f"{'-':>12}" for m in MEM_METHODS
            )
            + f" {ratio:>7.3f}"
        )

    print(
        "\n"
        "max relative error of the operator norm against float64 singular values: ours against "
        "the float64"
    )
    print(
        "Jacobian of the same linear piece (relu pattern) as our fp32 forward pass, and against "
        "the float64"
    )
    print(
        "network, beside the number of samples whose fp32 relu pattern differs from the float64 "
        "network's;"
    )
    print(
        "upstream's estimator (on its own fp32 Jacobian) against the float64 network, and its "
        "estimates of 0"
    )
    print(
        f"{'model':12} {'weights':8} {'median':>9} {'ours':>9} {'ours/net':>9} {'other pc':>8} "
        f"{'upstream':>9} {'upstream 0s':>11}"
    )
    for name, by_scale in errs.items():
        for label, e in by_scale.items():
            print(
                f"{name:12} {label:8} {e['median_norm']:>9.3g} {e['ours']:>9.1e} "
                f"{e['ours_net']:>9.1e} {e['other_piece']:>8} {e['upstream']:>9.1e} "
                f"{e['upstream_zeros']:>7}"
            )

    if reduced:
        print(
            "\nCUDA arithmetic: max relative error against the float64 network, speed-up over fp32"
        )
        for name, by_precision in reduced.items():
            print(
                f"{name:12} "
                + "  ".join(
                    f"{p} {err:.1e} x{speed:.2f}" for p, (err, speed) in by_precision.items()
                )
            )

    peak = peaks(device, args.quick)["conv_ieee_tflops"]
    print(
        f"\nours at width 64: samples/s; TFLOP/s at the work of one forward and K backward passes "
        f"(FlopCounterMode), its share of the IEEE fp32 convolution peak ({peak} TFLOP/s), and "
        "over that work done as upstream_frozen does it; seconds for 49,000 samples (a CIFAR-10 "
        "checkpoint)"
    )
    scale = {}
    for name, (rate, tflops, vs_frozen) in work.items():
        print(
            f"{name:12} {rate:>9.1f} {tflops:>8.3g} {tflops / peak:>7.1%} x{vs_frozen:.2f} "
            f"{49_000 / rate:>8.0f} s"
        )
        scale |= {
            f"{name}_samples_per_s": round(rate, 1),
            f"{name}_tflops": float(f"{tflops:.3g}"),
            f"{name}_of_conv_peak": float(f"{tflops / peak:.3g}"),
            f"{name}_vs_forward_k_backward": round(vs_frozen, 3),
            f"{name}_s_per_49000": round(49_000 / rate),
        }

    cuda = {}
    if reduced:
        for precision in ("tf32", "bf16"):
            cuda[f"{precision}_max_rel_err"] = float(
                f"{max(r[precision][0] for r in reduced.values()):.3g}"
            )
            cuda[f"{precision}_min_speedup"] = round(
                min(r[precision][1] for r in reduced.values()), 3
            )
        cuda["best_chunk_cuda"] = chunk_sweep(device)
    all_errs = [e for by_scale in errs.values() for e in by_scale.values()]
    print(
        json.dumps(
            {
                "vs_upstream_lowmem": round(min(r["vs_low"] for r in rows), 3),
                "vs_upstream_bigmem": round(min(r["vs_big"] for r in rows), 3),
                "peak_mem_vs_upstream_bigmem": round(max(mem_ratios), 4),
                "max_rel_err": float(f"{max(e['ours'] for e in all_errs):.3g}"),
                "max_rel_err_vs_float64_net": float(f"{max(e['ours_net'] for e in all_errs):.3g}"),
                "vs_upstream_frozen": round(min(r["vs_frozen"] for r in rows), 3),
                "upstream_max_rel_err": float(f"{max(e['upstream'] for e in all_errs):.3g}"),
                "upstream_zero_estimates": sum(e["upstream_zeros"] for e in all_errs),
                "samples": sum(r["n"] for r in rows),
                "conv_ieee_peak_tflops": peak,
                **scale,
                **cuda,
            }
        )
    )


if __name__ == "__main__":
    main()
