import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lipdd.measures import MEASURES, per_sample
from lipdd.measures.jacobian import CHUNK, input_jacobian
from lipdd.names import NORMALIZATIONS

METRICS = tuple(name for name, m in MEASURES.items() if m.kind == "sample")
JACOBIAN_METRICS = tuple(name for name in METRICS if "normalization" in MEASURES[name].options)

B, K = 5, 10


def small_cnn(in_channels=1):
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, K),
    )


def bn_cnn():
    # 3x6x6 inputs; BatchNorm buffers and an in-place ReLU must survive functional_call and vmap.
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, K),
    )
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    return model


def make_case(name):
    torch.manual_seed(0)
    model, shape = {"gray8": (small_cnn(), (1, 8, 8)), "rgb6": (bn_cnn(), (3, 6, 6))}[name]
    model.eval()
    x = torch.randn(B, *shape)
    targets = torch.randint(0, K, (B,))
    with torch.no_grad():
        targets[::2] = model(x)[::2].argmax(-1)  # some samples classified correctly, some not
    return model, x, targets


def reference_jacobian(model, x, targets, normalization, target_logit_only):
    """(B, K', D) float64 Jacobian, one sample at a time through autograd.functional."""
    model64 = copy.deepcopy(model).double()

    def output(xi, ti):
        z = model64(xi[None])
        if normalization == "crossentropy":
            return F.cross_entropy(z, ti[None]).reshape(1)
        out = {"none": z, "jacobian": z, "softmax": z.softmax(-1), "logsoftmax": z.log_softmax(-1)}[
            normalization
        ][0]
        return out[ti, None] if target_logit_only else out

    rows = [
        torch.autograd.functional.jacobian(lambda xi: output(xi, ti), xi)
        for xi, ti in zip(x.double(), targets)
    ]
    return torch.stack(rows).flatten(2)


def assert_rel_close(actual, expected, rtol=1e-5):
    rel = (actual.double() - expected).abs() / expected.abs()
    assert rel.max() <= rtol, f"max relative error {rel.max():.2e}"


@pytest.mark.parametrize("case", ["gray8", "rgb6"])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("target_logit_only", [False, True])
def test_jacobian_and_norms_match_float64_reference(case, normalization, target_logit_only):
    model, x, targets = make_case(case)
    ref = reference_jacobian(model, x, targets, normalization, target_logit_only)

    J = input_jacobian(model, x, targets, normalization, target_logit_only)
    assert J.shape == ref.shape and J.dtype == x.dtype
    torch.testing.assert_close(J.double(), ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())

    stats = per_sample(model, x, targets, JACOBIAN_METRICS, (normalization,), target_logit_only)
    assert_rel_close(
        stats["jacobian_operator_norm", normalization], torch.linalg.svdvals(ref)[:, 0]
    )
    assert_rel_close(stats["jacobian", normalization], torch.linalg.matrix_norm(ref))


@pytest.mark.parametrize("target_logit_only", [False, True])
def test_bigmem_matches_chunked(target_logit_only):
    model, x, targets = make_case("rgb6")
    for normalization in NORMALIZATIONS:
        torch.testing.assert_close(
            input_jacobian(model, x, targets, normalization, target_logit_only, bigmem=True),
            input_jacobian(model, x, targets, normalization, target_logit_only, bigmem=False),
        )
    # all normalisations at once take the shared logit-Jacobian route when they need more than K
    # rows
    big = per_sample(model, x, targets, METRICS, NORMALIZATIONS, target_logit_only, bigmem=True)
    small = per_sample(model, x, targets, METRICS, NORMALIZATIONS, target_logit_only, bigmem=False)
    assert big.keys() == small.keys()
    for key in big:
        torch.testing.assert_close(big[key], small[key])


def test_chunks_on_threads_of_their_own_match_one_thread():
    """On a multi-threaded CPU the chunks run concurrently, one per thread: the values are the
    single-threaded ones, in sample order, and the caller's thread count is left as it was."""
    torch.manual_seed(0)
    model = small_cnn().eval()
    x = torch.randn(3 * CHUNK["cpu"] + 5, 1, 8, 8)
    targets = torch.randint(0, K, (len(x),))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = per_sample(model, x, targets, METRICS, NORMALIZATIONS)
        torch.set_num_threads(3)
        concurrent = per_sample(model, x, targets, METRICS, NORMALIZATIONS)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert concurrent.keys() == serial.keys()
    for key in serial:
        torch.testing.assert_close(concurrent[key], serial[key], rtol=1e-6, atol=0)


def test_all_normalizations_at_once_match_one_at_a_time():
    model, x, targets = make_case("gray8")
    together = per_sample(model, x, targets, JACOBIAN_METRICS, NORMALIZATIONS)
    for normalization in NORMALIZATIONS:
        alone = per_sample(model, x, targets, JACOBIAN_METRICS, (normalization,))
        for key in alone:
            torch.testing.assert_close(together[key], alone[key])


def test_plain_metrics_and_keys():
    model, x, targets = make_case("gray8")
    stats = per_sample(model, x, targets, METRICS, ("none", "softmax"))
    expected_keys = {(m, n) for m in JACOBIAN_METRICS for n in ("none", "softmax")}
    expected_keys |= {("accuracy", None), ("crossentropy", None), ("confidence", None)}
    assert stats.keys() == expected_keys
    assert all(v.shape == (B,) and v.dtype == torch.float32 for v in stats.values())

    with torch.no_grad():
        z = model(x)
    for b in range(B):
        zb, t = z[b].double(), targets[b].item()
        p = zb.exp() / zb.exp().sum()
        assert stats["accuracy", None][b].item() == float(zb.argmax().item() == t)
        assert stats["crossentropy", None][b].item() == pytest.approx(
            (zb.exp().sum().log() - zb[t]).item(), rel=1e-6
        )
        distance = ((p - F.one_hot(torch.tensor(t), K)) ** 2).sum().sqrt().item()
        assert stats["confidence", None][b].item() == pytest.approx(distance, rel=1e-6)
    assert 0 < stats["accuracy", None].sum() < B

    # without jacobian metrics the normalizations are irrelevant and no Jacobian is computed
    plain = per_sample(model, x, targets, ("accuracy", "crossentropy", "confidence"), ())
    assert plain.keys() == {("accuracy", None), ("crossentropy", None), ("confidence", None)}
    for key in plain:
        torch.testing.assert_close(plain[key], stats[key])


def test_tiny_operator_norm_is_exact():
    # A power-iteration estimator with an absolute 1e-2 tolerance returns 0 here.
    model, x, targets = make_case("gray8")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.125)  # three layers: Jacobian ~2e-3 of the original, ~1e-4
    ref = torch.linalg.svdvals(reference_jacobian(model, x, targets, "none", False))[:, 0]
    assert (ref > 1e-5).all() and (ref < 1e-3).all()
    stats = per_sample(model, x, targets, ("jacobian_operator_norm",), ("none",))
    assert_rel_close(stats["jacobian_operator_norm", "none"], ref)


def test_each_sample_goes_forward_once():
    """One forward pass per chunk serves every metric and normalization."""
    model, x, targets = make_case("gray8")
    sizes = []
    model.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    per_sample(model, x, targets, METRICS, NORMALIZATIONS)
    assert sum(sizes) == B


def test_model_left_untouched():
    """Also when chunks run on several threads at once (functional_call's parameter swapping once
    left the model holding detached channels-last copies there)."""
    model, x, targets = make_case("rgb6")
    n = 2 * CHUNK["cpu"] // B
    x, targets = x.repeat(n, 1, 1, 1), targets.repeat(n)  # two chunks
    model[0].bias.requires_grad_(False)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    state = copy.deepcopy(model.state_dict())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for _ in range(3):
            per_sample(model, x, targets, METRICS, NORMALIZATIONS)
    finally:
        torch.set_num_threads(threads)
    input_jacobian(model, x, targets, "softmax", bigmem=True)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert all(p.is_contiguous() for p in params)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_unknown_names_raise():
    model, x, targets = make_case("gray8")
    with pytest.raises(ValueError, match="measure"):
        per_sample(model, x, targets, ("lipschitz",), ("none",))
    with pytest.raises(ValueError, match="normalization"):
        per_sample(model, x, targets, ("jacobian",), ("sigmoid",))
    with pytest.raises(ValueError, match="normalization"):
        input_jacobian(model, x, targets, "sigmoid")
    with pytest.raises(ValueError, match="at least one normalization"):
        per_sample(model, x, targets, ("jacobian",), ())
