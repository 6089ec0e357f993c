import math

import pytest
import torch
import torch.nn as nn

from lipdd.config import parse_model_name
from lipdd.models import MODEL_FAMILIES, WEIGHT_INITS, build_model

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


@pytest.mark.parametrize("family,num_bn", [("cnn5", 4), ("resnet18", 1 + 2 * 8 + 3)])
def test_batch_norm_replaces_conv_bias(family, num_bn):
    plain = build_model(family, 4, 3, 10)
    normed = build_model(family, 4, 3, 10, batch_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in normed.modules()) == num_bn
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert all(m.bias is None for m in normed.modules() if isinstance(m, nn.Conv2d))


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
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: block_inputs.append((module, args[0])))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), torch.zeros(2, 10))
    assert len(block_inputs) == 8
    for block, h in block_inputs:
        assert h.abs().sum() > 0  # otherwise a zero branch output would prove nothing
        assert not block.branch(h + block.bias1a).any()


def test_mfixup_is_nonzero():
    torch.manual_seed(0)
    model = build_model("resnet18", 4, 3, 10, weight_init="mfixup")
    assert model(torch.randn(2, 3, 32, 32)).abs().sum() > 0
    assert all(block.conv2.weight.abs().sum() > 0 for block in model.blocks)


def test_fixup_parameters_only_under_fixup():
    assert not any("bias1a" in key for key in build_model("resnet18", 2, 3, 10).state_dict())
    keys = build_model("resnet18", 2, 3, 10, weight_init="fixup").state_dict()
    assert {"blocks.0.bias1a", "blocks.0.bias1b", "blocks.0.bias2a", "blocks.0.bias2b", "blocks.0.scale"} <= set(keys)


def test_fixup_scales_first_conv():
    # conv1 of the widest block: std should be the Kaiming fan_out std times L^-0.5, with L = 16 blocks
    model = build_model("resnet34", 16, 3, 10, weight_init="fixup")
    w = model.blocks[-1].conv1.weight
    expected = math.sqrt(2 / (w.shape[0] * 9)) / 4
    assert w.std().item() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("weight_init", ["fixup", "mfixup"])
def test_fixup_rejects_cnn5(weight_init):
    with pytest.raises(ValueError, match="cnn5"):
        build_model("cnn5", 4, 3, 10, weight_init=weight_init)


def test_nkaiming_conv_std():
    model = build_model("cnn5", 64, 3, 10, weight_init="nkaiming")
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]  # 256 -> 512 channels
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)
    assert torch.equal(conv.bias, torch.zeros_like(conv.bias))


@pytest.mark.parametrize("weight_init", WEIGHT_INITS)
def test_same_seed_same_state_dict(weight_init):
    def build():
        torch.manual_seed(123)
        return build_model("resnet18", 3, 3, 10, weight_init=weight_init).state_dict()

    a, b = build(), build()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_channels_last():
    model = build_model("resnet18", 2, 3, 10, weight_init="mfixup").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    assert model(x).shape == (2, 10)
