"""Width-parameterised model families: the 5-layer CNN of Nakkiran et al. (2019) and CIFAR-style ResNets.

Width k scales every layer's channel count (k, 2k, 4k, 8k); k = 64 gives the standard networks.
ReLUs run in place on tensors nothing else reads (a conv's or batch norm's output, whose backward needs
only its input): fewer memory passes on CPU, and autograd accepts it.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MODEL_FAMILIES, WEIGHT_INITS

RESNET_STAGES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


def _conv(cin, cout, kernel_size, stride, batch_norm):
    # batch norm's own shift makes a conv bias redundant
    return nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, bias=not batch_norm)


def _norm(channels, batch_norm):
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


def cnn5(width, in_channels, num_classes, batch_norm=False):
    layers = []
    cin = in_channels
    for i in range(4):
        cout = width * 2**i
        layers += [_conv(cin, cout, 3, 1, batch_norm), _norm(cout, batch_norm), nn.ReLU(inplace=True)]
        if i in (1, 2):
            layers.append(nn.AvgPool2d(2))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, batch_norm, fixup):
        super().__init__()
        self.conv1 = _conv(cin, cout, 3, stride, batch_norm)
        self.bn1 = _norm(cout, batch_norm)
        self.conv2 = _conv(cout, cout, 3, 1, batch_norm)
        self.bn2 = _norm(cout, batch_norm)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride, batch_norm), _norm(cout, batch_norm))
        else:
            self.shortcut = nn.Identity()
        # Fixup's scalar biases and multiplier exist only under Fixup so plain state_dicts stay plain
        self.fixup = fixup
        if fixup:
            self.bias1a, self.bias1b, self.bias2a, self.bias2b = (nn.Parameter(torch.zeros(1)) for _ in range(4))
            self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        if self.fixup:
            x = x + self.bias1a  # the shortcut sees the shifted input too, as in the Fixup paper
        return F.relu(self.branch(x) + self.shortcut(x), inplace=True)

    def branch(self, x):
        """The residual branch; under Fixup, x must already include bias1a."""
        if not self.fixup:
            return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True)))
        out = F.relu(self.bn1(self.conv1(x)) + self.bias1b, inplace=True)
        return self.bn2(self.conv2(out + self.bias2a)) * self.scale + self.bias2b


class ResNet(nn.Module):
    def __init__(self, stages, width, in_channels, num_classes, batch_norm=False, fixup=False):
        super().__init__()
        self.stem = nn.Sequential(_conv(in_channels, width, 3, 1, batch_norm), _norm(width, batch_norm))
        blocks = []
        cin = width
        for i, num_blocks in enumerate(stages):
            cout = width * 2**i
            for j in range(num_blocks):
                # padding 1 makes strided convs map 8 -> 4 -> 2 -> 1, so 8x8 inputs work
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride, batch_norm, fixup))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.stem(x), inplace=True)))


def _init_nkaiming(model):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# Fixup (Zhang et al. 2019): every conv starts Kaiming normal (fan_out), conv biases zero; the first conv of each
# residual branch is scaled by L^(-1/(2m-2)) = L^-0.5 (L blocks, m = 2 convs per branch), the last conv and the
# linear layer start at zero, so each block starts as its shortcut and the network output is exactly zero.
# mfixup ("modified Fixup") scales the last conv by L^-0.5 too instead of zeroing it and keeps the default linear
# init, so the network is non-degenerate at init and its input Jacobian is not just the shortcut path.
def _init_fixup(model, zero_last):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    scale = len(blocks) ** -0.5
    with torch.no_grad():
        for block in blocks:
            block.conv1.weight.mul_(scale)
            if zero_last:
                block.conv2.weight.zero_()
            else:
                block.conv2.weight.mul_(scale)
        if zero_last:
            model.head[-1].weight.zero_()
            model.head[-1].bias.zero_()


def build_model(
    family: str,
    width: int,
    in_channels: int,
    num_classes: int,
    batch_norm: bool = False,
    weight_init: str = "pytorch",
) -> nn.Module:
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; families are {', '.join(MODEL_FAMILIES)}")
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"unknown weight_init {weight_init!r}; choose from {', '.join(WEIGHT_INITS)}")
    fixup = weight_init in ("fixup", "mfixup")
    if fixup and family not in RESNET_STAGES:
        raise ValueError(f"weight_init {weight_init!r} needs a residual network, not {family!r}")
    if fixup and batch_norm:
        raise ValueError(f"weight_init {weight_init!r} replaces batch norm; use batch_norm=False")

    if family == "cnn5":
        model = cnn5(width, in_channels, num_classes, batch_norm)
    else:
        model = ResNet(RESNET_STAGES[family], width, in_channels, num_classes, batch_norm, fixup)

    if weight_init == "nkaiming":
        _init_nkaiming(model)
    elif fixup:
        _init_fixup(model, zero_last=weight_init == "fixup")
    return model


def model_for(cfg, meta: dict) -> nn.Module:
    """The network a run configured by `cfg` (a Config) trains, shaped for its prepared data."""
    return build_model(cfg.model, cfg.width, in_channels=meta["image_shape"][2], num_classes=meta["num_classes"],
                       batch_norm="batch_norm" in cfg.model_additions, weight_init=cfg.weight_init)
