"""Per-sample statistics of a classifier, chiefly the operator norm of each sample's input-output Jacobian.

Every Jacobian here comes from one forward pass and one vectorised backward pass of the *logits*: a
normalisation (softmax, log_softmax, cross-entropy, picking the target entry) is a small per-sample map
A (K' x K) applied to the logits, so by the chain rule its Jacobian is A @ J_logits. Backpropagating the
rows of A directly costs K' backward rows; computing J_logits once (K rows) and multiplying serves any
number of normalisations. We take whichever needs fewer rows.
"""

import itertools

import torch
import torch.nn.functional as F

METRICS = ("jacobian_operator_norm", "jacobian", "accuracy", "crossentropy", "confidence")
JACOBIAN_METRICS = ("jacobian_operator_norm", "jacobian")
NORMALIZATIONS = ("none", "softmax", "logsoftmax", "crossentropy")


def _check(names, allowed, kind):
    for name in names:
        if name not in allowed:
            raise ValueError(f"unknown {kind} {name!r}, expected one of {allowed}")


def _logit_map(logits, targets, normalization, target_logit_only):
    """(B, K', K) Jacobian of the normalised output w.r.t. the logits, per sample."""
    B, K = logits.shape
    p = logits.softmax(-1)
    if normalization == "crossentropy":
        return (p - F.one_hot(targets, K).to(p.dtype))[:, None, :]  # d CE / dz = p - y
    eye = torch.eye(K, dtype=logits.dtype, device=logits.device).expand(B, K, K)
    if normalization == "none":
        A = eye
    elif normalization == "softmax":
        A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # d p_i / dz_j = p_i (delta_ij - p_j)
    else:  # logsoftmax
        A = eye - p[:, None, :]  # d log p_i / dz_j = delta_ij - p_j
    if target_logit_only:
        A = A[torch.arange(B, device=A.device), targets][:, None, :]
    return A


def _backward_rows(vjp_fn, rows, bigmem):
    """(B, R, D) rows @ J_logits per sample, R cotangents in one vmapped backward pass.

    Samples are independent (eval mode), so backpropagating the (B, K) cotangent rows[:, r] gives every
    sample's row r at once. bigmem=False vmaps one cotangent at a time (chunk_size=1): peak memory is the
    forward activations plus one plain backward. It is also the fastest on CPU: for all 10 rows of a
    4-conv CNN on 128 3x32x32 images (1 thread) chunk_size=1 took 0.79 s, 2: 1.3 s, 5: 2.2 s, all
    (bigmem): 2.7 s, and sub-batches of 13 samples with all rows at once: 0.91 s.
    """
    grads = torch.func.vmap(vjp_fn, in_dims=1, out_dims=1, chunk_size=None if bigmem else 1)(rows)[0]
    return grads.flatten(2)


def _jacobians(model, x, targets, normalizations, target_logit_only, bigmem):
    """logits (B, K) and {normalization: (B, K', D) Jacobian}, from one forward and one backward pass."""
    # Detached parameters: autograd tracks the input only and never builds parameter gradients,
    # without touching the model's requires_grad flags.
    state = {k: v.detach() for k, v in itertools.chain(model.named_parameters(), model.named_buffers())}
    logits, vjp_fn = torch.func.vjp(lambda x: torch.func.functional_call(model, state, (x,)), x)
    maps = {n: _logit_map(logits, targets, n, target_logit_only) for n in normalizations}
    sizes = [A.shape[1] for A in maps.values()]
    B, K = logits.shape
    if sum(sizes) <= K:
        J = _backward_rows(vjp_fn, torch.cat(list(maps.values()), dim=1), bigmem)
        return logits, dict(zip(maps, J.split(sizes, dim=1)))
    J = _backward_rows(vjp_fn, torch.eye(K, dtype=logits.dtype, device=logits.device).expand(B, K, K), bigmem)
    return logits, {n: A @ J for n, A in maps.items()}


def _operator_norm(J):
    """(B,) largest singular value of each (K', D) matrix in J, exactly.

    Top eigenvalue of the small K' x K' Gram matrix J J^T, built in float32 and solved in float64: for
    128 10x3072 matrices it took 4 ms with 2e-7 relative error against float64 svdvals, while
    matrix_norm(J, ord=2), an SVD of the wide matrix, took 37 ms with 6e-7. The clamp guards the sqrt
    against rounding below zero.
    """
    gram = J @ J.mT
    return torch.linalg.eigvalsh(gram.double())[:, -1].clamp_min(0).sqrt().to(J.dtype)


def input_jacobian(model, x, targets, normalization="none", target_logit_only=False, bigmem=False):
    """(B, K', D) Jacobian of each sample's (normalised) output w.r.t. its own input, D = C*H*W."""
    _check((normalization,), NORMALIZATIONS, "normalization")
    return _jacobians(model, x, targets, (normalization,), target_logit_only, bigmem)[1][normalization]


def sample_stats(model, x, targets, metrics, normalizations, target_logit_only=False, bigmem=False):
    """Per-sample values, shape (B,) in the logits' dtype, keyed by (metric, normalization).

    Jacobian metrics get one entry per normalization; accuracy, crossentropy and confidence one entry
    keyed (metric, "none"). The model should be in eval mode so that samples are independent.
    """
    _check(metrics, METRICS, "metric")
    _check(normalizations, NORMALIZATIONS, "normalization")
    stats = {}
    if any(m in JACOBIAN_METRICS for m in metrics):
        if not normalizations:
            raise ValueError("jacobian metrics need at least one normalization")
        unique = tuple(dict.fromkeys(normalizations))
        logits, jacobians = _jacobians(model, x, targets, unique, target_logit_only, bigmem)
        for n, J in jacobians.items():
            if "jacobian_operator_norm" in metrics:
                stats["jacobian_operator_norm", n] = _operator_norm(J)
            if "jacobian" in metrics:
                stats["jacobian", n] = torch.linalg.vector_norm(J, dim=(1, 2))
    else:
        with torch.no_grad():
            logits = model(x)
    if "accuracy" in metrics:
        stats["accuracy", "none"] = (logits.argmax(-1) == targets).to(logits.dtype)
    if "crossentropy" in metrics:
        stats["crossentropy", "none"] = F.cross_entropy(logits, targets, reduction="none")
    if "confidence" in metrics:
        onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        stats["confidence", "none"] = torch.linalg.vector_norm(logits.softmax(-1) - onehot, dim=-1)
    return stats
