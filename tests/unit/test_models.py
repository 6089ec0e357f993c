import math

import pytest
import torch
import torch.nn as nn

from lipdd.config import parse_model_name
from lipdd.models import build_model
from lipdd.names import MODEL_FAMILIES, WEIGHT_INITS
from upstream_reference import upstream_model

INPUTS = [(1, 8), (3, 32)]  # (channels, side): 8x8x1 and 32x32x3


def shape_cases():
    for family, widths in [("cnn5", (1, 7, 64)), ("resnet18", (1, 7, 64)), ("resnet34", (1, 7))]:
        for width in widths:
            for channels, side in INPUTS:
                yield family, width, channels, side


@pytest.mark.parametrize("family,width,channels,side", list(shape_cases()))
def test_output_shape(family, width, channels, side):
    model = build_model(family, width, channels, num_classes=10)
    assert model(torch.randn(2, channels, side, side)).shape == (2, 10)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_batch_norm_output_shape(family):
    model = build_model(family, 2, 1, num_classes=10, batch_norm=True)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def cnn5_param_count(k, cin, classes):
    channels = [cin, k, 2 * k, 4 * k, 8 * k]
    convs = sum(9 * a * b + b for a, b in zip(channels, channels[1:]))
    return convs + 8 * k * classes + classes


@pytest.mark.parametrize("k", [1, 16])
def test_cnn5_param_count(k):
    model = build_model("cnn5", k, 3, 10)
    assert sum(p.numel() for p in model.parameters()) == cnn5_param_count(k, 3, 10)


@pytest.mark.parametrize("family,num_bn", [("cnn5", 4), ("resnet18", 1 + 2 * 8)])
def test_batch_norm_replaces_conv_bias(family, num_bn):
    plain = build_model(family, 4, 3, 10)
    normed = build_model(family, 4, 3, 10, batch_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in normed.modules()) == num_bn
    # 3x3 convolutions have a bias exactly without batch norm; upstream's 1x1 shortcuts never have
    # one
    for model, bias in ((plain, True), (normed, False)):
        assert all(
            (m.bias is not None) == (bias and m.kernel_size == (3, 3))
            for m in model.modules()
            if isinstance(m, nn.Conv2d)
        )


@pytest.mark.parametrize("family", MODEL_FAMILIES)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_upstream_parameter_names_and_weights(family, batch_norm):
    """Same seed, same network as upstream's: its parameter names (strict load both ways), and
    bitwise the same default initialisation, because the weights are drawn in upstream's order."""
    torch.manual_seed(7)
    ours = build_model(family, 3, 3, 10, batch_norm=batch_norm)
    torch.manual_seed(7)
    seed = upstream_model(family, 3, bn=batch_norm)
    assert list(ours.state_dict()) == list(seed.state_dict())
    assert all(torch.equal(v, seed.state_dict()[k]) for k, v in ours.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(ours.eval()(x), seed.eval()(x), atol=1e-6)


def test_upstream_parameter_names_spelled_out():
    cnn5 = list(build_model("cnn5", 2, 3, 10).state_dict())
    assert cnn5 == [f"layer{i}.conv.{p}" for i in range(1, 5) for p in ("weight", "bias")] + [
        "fc.weight",
        "fc.bias",
    ]
    resnet = build_model("resnet18", 2, 3, 10).state_dict()
    assert {
        "conv1.weight",
        "conv1.bias",
        "layer1.0.conv1.weight",
        "layer2.0.downsample.0.weight",
        "layer4.1.conv2.bias",
        "fc.weight",
    } <= set(resnet)
    assert "layer2.0.downsample.0.bias" not in resnet and not any(
        k.startswith("bn1") for k in resnet
    )


@pytest.mark.parametrize(
    "name,width,expected",
    [
        ("cnn5_16", None, ("cnn5", 16)),
        ("cnn5_16", 16, ("cnn5", 16)),
        ("resnet18", None, ("resnet18", 64)),
        ("resnet18", 8, ("resnet18", 8)),
        ("resnet34_8", None, ("resnet34", 8)),
    ],
)
def test_parse_model_name(name, width, expected):
    assert parse_model_name(name, width) == expected


@pytest.mark.parametrize(
    "name,width,match",
    [
        ("cnn5_16", 8, "says width 16 but width is 8"),
        ("vgg11", None, "vgg11"),
        ("cnn5_0", None, "cnn5_0"),
        ("cnn5_x", None, "cnn5_x"),
        ("cnn5_1_6", None, "cnn5_1_6"),
        ("resnet18", 0, "resnet18"),
    ],
)
def test_parse_model_name_rejects(name, width, match):
    with pytest.raises(ValueError, match=match):
        parse_model_name(name, width)


def test_fixup_starts_at_zero():
    torch.manual_seed(0)
    model = build_model("resnet18", 4, 3, 10, weight_init="fixup")
    block_inputs = []
    for stage in model.stages():
        for block in stage:
            block.register_forward_pre_hook(
                lambda module, args: block_inputs.append((module, args[0]))
            )
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), torch.zeros(2, 10))
    assert len(block_inputs) == 8
    for block, h in block_inputs:
        assert h.abs().sum() > 0  # otherwise a zero branch output would prove nothing
        assert not block.branch(h).any()


@pytest.mark.parametrize("weight_init", ["fixup", "mfixup"])
def test_fixup_as_upstream_draws_it(weight_init):
    """Upstream's Fixup re-draws only the residual branches and the linear layer, after PyTorch's
    default draws: the stem and the shortcuts are the default network's; no extra parameters."""
    torch.manual_seed(3)
    default = build_model("resnet18", 4, 3, 10).state_dict()
    torch.manual_seed(3)
    fixup = build_model("resnet18", 4, 3, 10, weight_init=weight_init).state_dict()
    assert list(fixup) == list(default)
    for key in (
        "conv1.weight",
        "conv1.bias",
        "layer2.0.downsample.0.weight",
        "layer4.0.downsample.0.weight",
    ):
        assert torch.equal(fixup[key], default[key]), key
    assert not fixup["layer1.0.conv1.bias"].any() and not fixup["layer3.1.conv2.bias"].any()
    second, fc = fixup["layer4.1.conv2.weight"], fixup["fc.weight"]
    if weight_init == "fixup":
        assert not second.any() and not fc.any()
    else:
        assert second.std().item() == pytest.approx(
            1e-6, rel=0.05
        ) and fc.std().item() == pytest.approx(1e-6, rel=0.1)


def test_fixup_scales_first_conv():
    # conv1 of the widest block: std should be the Kaiming fan_out std times L^-0.5, with L = 16
    # blocks
    model = build_model("resnet34", 16, 3, 10, weight_init="fixup")
    w = model.layer4[-1].conv1.weight
    expected = math.sqrt(2 / (w.shape[0] * 9)) / 4
    assert w.std().item() == pytest.approx(expected, rel=0.05)


def test_dropout_before_the_last_layer():
    torch.manual_seed(0)
    model = build_model("cnn5", 4, 3, 10, dropout=0.5)
    x = torch.randn(4, 3, 8, 8)
    assert not torch.equal(model.train()(x), model(x))  # dropout draws in training
    assert torch.equal(model.eval()(x), model(x))  # and is the identity in eval mode
    assert list(model.state_dict()) == list(build_model("cnn5", 4, 3, 10).state_dict())


@pytest.mark.parametrize("weight_init", ["fixup", "mfixup"])
def test_fixup_rejects_cnn5(weight_init):
    with pytest.raises(ValueError, match="cnn5"):
        build_model("cnn5", 4, 3, 10, weight_init=weight_init)


def test_nkaiming_conv_std():
    model = build_model("cnn5", 64, 3, 10, weight_init="nkaiming")
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]  # 256 -> 512 channels
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)
    assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    # upstream's nkaiming draws the linear layer too, Kaiming fan_out with a linear gain
    assert model.fc.weight.std().item() == pytest.approx(math.sqrt(1 / 10), rel=0.05)
    assert not model.fc.bias.any()


@pytest.mark.parametrize("weight_init", WEIGHT_INITS)
def test_same_seed_same_state_dict(weight_init):
    def build():
        torch.manual_seed(123)
        return build_model("resnet18", 3, 3, 10, weight_init=weight_init).state_dict()

    a, b = build(), build()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_channels_last():
    model = build_model("resnet18", 2, 3, 10, weight_init="mfixup").to(
        memory_format=torch.channels_last
    )
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    assert model(x).shape == (2, 10)
