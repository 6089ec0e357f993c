"""Width-parameterised model families: the 5-layer CNN of Nakkiran et al. (2019) and CIFAR-style
ResNets.

Width k scales every layer's channel count (k, 2k, 4k, 8k); k = 64 gives the standard networks.
ReLUs run in place on tensors nothing else reads (a conv's or batch norm's output, whose backward
needs only its input): fewer memory passes on CPU, and autograd accepts it.

Each network describes its own linear pieces for the Lipschitz upper bound (`linear_pieces`, read by
lipdd.measures.lipschitz): ("chain", name, layers), linear layers with nn.ReLU() between the maps,
and ("residual", name, shortcut or None, first, second) for relu(second(relu(first(x))) +
shortcut(x)).
"""

import math

import torch.nn as nn
import torch.nn.functional as F

from .names import MODEL_FAMILIES, WEIGHT_INITS

RESNET_STAGES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


def _conv3x3(cin, cout, stride, batch_norm):
    # batch norm's own shift makes a conv bias redundant
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not batch_norm)


def _norm(channels, batch_norm):
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


def _dropout(rate):
    return nn.Dropout(rate) if rate else nn.Identity()


class ConvBlock(nn.Module):
    """conv 3x3 -> (batch norm) -> ReLU."""

    def __init__(self, cin, cout, batch_norm):
        super().__init__()
        self.conv = _conv3x3(cin, cout, 1, batch_norm)
        self.bn = _norm(cout, batch_norm)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class CNN5(nn.Module):
    """Four conv blocks of widths k, 2k, 4k, 8k, average pooling after the second and third, global
    average pooling, a linear layer."""

    def __init__(self, width, in_channels, num_classes, batch_norm=False, dropout=0.0):
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.apool = nn.AdaptiveAvgPool2d(1)
        self.layer1 = ConvBlock(in_channels, width, batch_norm)
        self.layer2 = ConvBlock(width, 2 * width, batch_norm)
        self.layer3 = ConvBlock(2 * width, 4 * width, batch_norm)
        self.layer4 = ConvBlock(4 * width, 8 * width, batch_norm)
        self.dropout = _dropout(dropout)
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x):
        x = self.pool(self.layer2(self.layer1(x)))
        x = self.layer4(self.pool(self.layer3(x)))
        return self.fc(self.dropout(self.apool(x).flatten(1)))

    def linear_pieces(self) -> list[tuple]:
        relu, blocks = nn.ReLU(), (self.layer1, self.layer2, self.layer3, self.layer4)
        layers = [[b.conv, b.bn, relu] for b in blocks]
        layers[1].append(self.pool)
        layers[2].append(self.pool)
        tail = [self.apool, nn.Flatten(), self.dropout, self.fc]
        return [("chain", "layers", [m for block in layers for m in block] + tail)]


class BasicBlock(nn.Module):
    """relu(branch(x) + shortcut(x)); the shortcut is a bias-free strided 1x1 convolution (no batch
    norm, even with the batch_norm addition) where the shape changes, else the identity."""

    def __init__(self, cin, cout, stride, batch_norm):
        super().__init__()
        # The shortcut is built first: its weights are drawn before the branch's, as in upstream.
        downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False))
            if stride != 1 or cin != cout
            else None
        )
        self.conv1 = _conv3x3(cin, cout, stride, batch_norm)
        self.bn1 = _norm(cout, batch_norm)
        self.conv2 = _conv3x3(cout, cout, 1, batch_norm)
        self.bn2 = _norm(cout, batch_norm)
        self.downsample = downsample

    def forward(self, x):
        return F.relu(self.branch(x) + self.shortcut(x), inplace=True)

    def branch(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True)))

    def shortcut(self, x):
        return x if self.downsample is None else self.downsample(x)


class ResNet(nn.Module):
    def __init__(self, stages, width, in_channels, num_classes, batch_norm=False, dropout=0.0):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, width, 1, batch_norm)
        self.bn1 = _norm(width, batch_norm)
        cin = width
        for i, num_blocks in enumerate(stages):
            cout = width * 2**i
            blocks = []
            for j in range(num_blocks):
                # padding 1 makes strided convs map 8 -> 4 -> 2 -> 1, so 8x8 inputs work
                blocks.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1, batch_norm))
                cin = cout
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = _dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)

    def stages(self) -> list[nn.Sequential]:
        return [m for name, m in self.named_children() if name.startswith("layer")]

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        for stage in self.stages():
            x = stage(x)
        return self.fc(self.dropout(self.avgpool(x).flatten(1)))

    def linear_pieces(self) -> list[tuple]:
        pieces = [("chain", "stem", [self.conv1, self.bn1])]
        for i, stage in enumerate(self.stages()):
            for j, b in enumerate(stage):
                first, second = nn.Sequential(b.conv1, b.bn1), nn.Sequential(b.conv2, b.bn2)
                pieces.append(("residual", f"layer{i + 1}.{j}", b.downsample, first, second))
        pieces.append(("chain", "head", [self.avgpool, nn.Flatten(), self.dropout, self.fc]))
        return pieces


def _init_nkaiming(model):
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nonlinearity = "linear" if isinstance(m, nn.Linear) else "relu"
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# Fixup (Zhang et al. 2019) as upstream initialises it: the first conv of each residual branch is
# normal with the Kaiming fan_out std times L^-0.5 (L: the number of blocks); under "fixup" the
# second conv and the linear layer start at zero, so each block starts as its shortcut and the
# output is 0; "mfixup" (modified) draws them normal with std 1e-6 instead, so the network starts
# non-degenerate. Every other layer keeps PyTorch's default initialisation; no extra parameters.
def _init_fixup(model, modified):
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    for m in model.modules():
        if isinstance(m, BasicBlock):
            w = m.conv1.weight
            nn.init.normal_(
                w, 0, math.sqrt(2.0 / (w.shape[0] * math.prod(w.shape[2:]))) * len(blocks) ** -0.5
            )
            if modified:
                nn.init.normal_(m.conv2.weight, 0, 1e-6)
            else:
                nn.init.zeros_(m.conv2.weight)
            for conv in (m.conv1, m.conv2):
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
        elif isinstance(m, nn.Linear):
            if modified:
                nn.init.normal_(m.weight, 0, 1e-6)
            else:
                nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(
    family: str,
    width: int,
    in_channels: int,
    num_classes: int,
    batch_norm: bool = False,
    weight_init: str = "pytorch",
    dropout: float = 0.0,
) -> nn.Module:
    if family not in MODEL_FAMILIES:
        raise ValueError(
            f"unknown model family {family!r}; families are {', '.join(MODEL_FAMILIES)}"
        )
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    if weight_init not in WEIGHT_INITS:
        raise ValueError(
            f"unknown weight_init {weight_init!r}; choose from {', '.join(WEIGHT_INITS)}"
        )
    fixup = weight_init in ("fixup", "mfixup")
    if fixup and family not in RESNET_STAGES:
        raise ValueError(f"weight_init {weight_init!r} needs a residual network, not {family!r}")
    if fixup and batch_norm:
        raise ValueError(f"weight_init {weight_init!r} replaces batch norm; use batch_norm=False")

    if family == "cnn5":
        model = CNN5(width, in_channels, num_classes, batch_norm, dropout)
    else:
        model = ResNet(RESNET_STAGES[family], width, in_channels, num_classes, batch_norm, dropout)

    if weight_init == "nkaiming":
        _init_nkaiming(model)
    elif fixup:
        _init_fixup(model, modified=weight_init == "mfixup")
    return model


def model_for(cfg, meta: dict) -> nn.Module:
    """The network a run configured by `cfg` (a Config) trains, shaped for its prepared data."""
    return build_model(
        cfg.model,
        cfg.width,
        in_channels=meta["image_shape"][2],
        num_classes=meta["num_classes"],
        batch_norm="batch_norm" in cfg.model_additions,
        weight_init=cfg.weight_init,
        dropout=cfg.dropout if "dropout" in cfg.model_additions else 0.0,
    )
