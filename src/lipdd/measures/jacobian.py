"""Input-output Jacobians of a classifier, per sample, and their exact operator norm.

Every Jacobian here comes from one forward pass and backward passes of the *logits* for a whole
batch of samples at once: a normalisation (softmax, log_softmax, cross-entropy, picking the target
entry) is a small per-sample map A (K' x K) applied to the logits, so by the chain rule its Jacobian
is A @ J_logits. Backpropagating the rows of A directly costs K' backward rows; computing J_logits
once (K rows) and multiplying serves any number of normalisations. We take whichever needs fewer
rows.

The arithmetic is IEEE float32 unless asked otherwise (`precision`), so the norms are exact to
float32 rounding: the operator norm comes from the singular values of the small K' x D matrix, not
from power iteration.
"""

import contextlib
import copy
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from ..names import NORMALIZATIONS

PRECISIONS = ("fp32", "tf32", "bf16")
# Samples per forward pass when bigmem is off (see jacobians). On CPU a chunk's activations stay in
# cache. On a GPU small chunks leave it idle between kernel launches, so they are larger there,
# still a bounded fraction of its memory; not yet measured.
CHUNK = {"cpu": 32, "cuda": 256}


def _logit_map(logits, targets, normalization, target_logit_only):
    """(B, K', K) Jacobian of the normalised output w.r.t. the logits, per sample."""
    B, K = logits.shape
    p = logits.softmax(-1)
    if normalization == "crossentropy":
        return (p - F.one_hot(targets, K).to(p.dtype))[:, None, :]  # d CE / dz = p - y
    eye = torch.eye(K, dtype=logits.dtype, device=logits.device).expand(B, K, K)
    if normalization in ("none", "jacobian"):
        A = eye
    elif normalization == "softmax":
        A = (
            torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        )  # d p_i / dz_j = p_i (delta_ij - p_j)
    else:  # logsoftmax
        A = eye - p[:, None, :]  # d log p_i / dz_j = delta_ij - p_j
    if target_logit_only:
        A = A[torch.arange(B, device=A.device), targets][:, None, :]
    return A


@contextlib.contextmanager
def _arithmetic(device, precision):
    """IEEE float32 by default, also on CUDA, where cuDNN convolutions otherwise run in TF32 on
    Ampere and later GPUs (torch.backends.cudnn.conv.fp32_precision defaults to "tf32"). "tf32"
    (TF32 convolutions and matmuls) and "bf16" (autocast) are CUDA-only options that trade exactness
    for speed; see benchmarks/bench_stats.py --device cuda for their error against float64."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}, expected one of {PRECISIONS}")
    if device.type != "cuda":
        if precision != "fp32":
            raise ValueError(
                f"precision {precision!r} is for CUDA devices; on {device.type} it is fp32"
            )
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "tf32" if precision == "tf32" else "ieee"
    try:
        with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def _frozen_copy(model, channels_last):
    """A copy of the model whose parameters autograd does not track.

    Autograd then tracks the input only: no parameter gradient is ever computed (upstream's backward
    passes spent about half their time on them), and the caller's model stays untouched. A copy, not
    torch.func.functional_call with detached tensors: functional_call swaps the module's own
    parameters in and out around each call, so chunks on several threads at once undid each other's
    swaps and left the caller's model holding the detached tensors. On CPU, weights go channels-last
    (inputs in _chunk_jacobians): oneDNN's convolutions then run without layout reorders.
    """
    frozen = copy.deepcopy(model).requires_grad_(False)
    return frozen.to(memory_format=torch.channels_last) if channels_last else frozen


def _backward_rows(logits, x, rows, bigmem):
    """(B, R, D) rows @ J_logits per sample, from the graph of one forward pass.

    Samples are independent (eval mode), so backpropagating the (B, K) cotangent rows[:, r] gives
    every sample's row r at once. bigmem=False runs the R backward passes one after another on the
    retained graph: peak memory is the forward activations plus one plain backward. bigmem=True
    sends all R rows through one vectorised backward (autograd's is_grads_batched, a vmap over the
    cotangents): R times the backward's transient memory, fewer, larger kernels. On CPU the row loop
    is the faster of the two (benchmarks/bench_stats.py measures both); a vmap over the rows with
    chunk_size=1 costs the same kernels plus vmap's per-op overhead.
    """
    B, R, _ = rows.shape
    out = torch.empty(B, R, *x.shape[1:], dtype=x.dtype, device=x.device)
    if bigmem:
        grads = torch.autograd.grad(logits, x, rows.transpose(0, 1), is_grads_batched=True)[0]
        out.copy_(grads.transpose(0, 1))  # also turns channels-last back into C, H, W order
    else:
        for r in range(R):
            out[:, r].copy_(torch.autograd.grad(logits, x, rows[:, r], retain_graph=r < R - 1)[0])
    return out.flatten(2)


def jacobians(
    model, x, targets, normalizations, target_logit_only=False, bigmem=False, precision="fp32"
):
    """logits (B, K) and {normalization: (B, K', D) Jacobian}: per chunk of samples, one forward
    pass and K' or K backward rows, whichever is fewer.

    bigmem=False works on chunks of at most CHUNK samples, so peak memory is that of a chunk (per
    CPU thread) whatever the batch size; on CPU it is also faster, since a chunk's activations stay
    in cache. On a multi-threaded CPU the chunks run concurrently (_concurrently), and a batch of
    fewer than CHUNK samples per thread is split so that every thread gets one. bigmem=True takes
    the batch at once.
    """
    cpu = x.device.type == "cpu"
    threads = torch.get_num_threads() if cpu else 1
    size = len(x) if bigmem else min(CHUNK["cpu" if cpu else "cuda"], -(-len(x) // threads))
    chunks, targets = x.split(size), targets.split(size)
    channels_last = cpu and x.dim() == 4
    with _arithmetic(x.device, precision):
        frozen = _frozen_copy(model, channels_last)

        def chunk(xc, tc):
            return _chunk_jacobians(
                frozen, xc, tc, normalizations, target_logit_only, bigmem, channels_last
            )

        if threads > 1 and len(chunks) > 1:
            parts = _concurrently(chunk, chunks, targets, workers=min(threads, len(chunks)))
        else:
            parts = [chunk(xc, tc) for xc, tc in zip(chunks, targets)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), {
        n: torch.cat([p[1][n] for p in parts]) for n in normalizations
    }


def _concurrently(fn, *iterables, workers):
    """[fn(*args) for args in zip(*iterables)], `workers` calls at a time, each on a thread of its
    own whose ops run single-threaded. A chunk's convolutions are too small to split well across
    cores; whole chunks in parallel keep every core busy (docs/performance.md). Autograd runs a CPU
    backward on the thread that calls it, so the chunks' graphs never meet.
    Memory:
    `workers` chunks at a time."""
    threads = torch.get_num_threads()
    # OpenMP's thread count is a per-thread setting: each worker sets its own, and the caller's is
    # restored in case this build's setting is global.
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        try:
            return list(pool.map(fn, *iterables))
        finally:
            torch.set_num_threads(threads)


def _chunk_jacobians(model, x, targets, normalizations, target_logit_only, bigmem, channels_last):
    # A detached alias: autograd tracks it, the caller's tensor is untouched
    x = x.detach().contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    x.requires_grad_(True)
    logits = model(x).to(x.dtype)  # float32 under bf16 autocast too
    with torch.no_grad():
        maps = {n: _logit_map(logits, targets, n, target_logit_only) for n in normalizations}
    sizes = [A.shape[1] for A in maps.values()]
    B, K = logits.shape
    if sum(sizes) <= K:
        J = _backward_rows(logits, x, torch.cat(list(maps.values()), dim=1), bigmem)
        return logits.detach(), dict(zip(maps, J.split(sizes, dim=1)))
    eye = torch.eye(K, dtype=logits.dtype, device=logits.device).expand(B, K, K)
    J = _backward_rows(logits, x, eye, bigmem)
    return logits.detach(), {n: A @ J for n, A in maps.items()}


def operator_norm(J):
    """(B,) largest singular value of each (K', D) matrix in J, exactly.

    Top eigenvalue of the small K' x K' Gram matrix J J^T, built in float32 and solved in float64:
    several times faster than an SVD of the wide matrix (matrix_norm(J, ord=2)), and no less
    accurate. The clamp guards the sqrt against rounding below zero.
    """
    gram = J @ J.mT
    return torch.linalg.eigvalsh(gram.double())[:, -1].clamp_min(0).sqrt().to(J.dtype)


def input_jacobian(
    model, x, targets, normalization="none", target_logit_only=False, bigmem=False, precision="fp32"
):
    """(B, K', D) Jacobian of each sample's (normalised) output w.r.t. its own input, D = C*H*W."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"unknown normalization {normalization!r}, expected one of {NORMALIZATIONS}"
        )
    return jacobians(model, x, targets, (normalization,), target_logit_only, bigmem, precision)[1][
        normalization
    ]
