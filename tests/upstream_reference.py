"""Upstream's behaviour (magamba/overparameterization), written down independently as references for
the tests: its networks as its compute_stats.py builds them (parameter names, the order weights are
drawn in), its split, its label noise and its sample order, each with the library calls upstream
makes. lipdd's own code must reproduce these exactly."""

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset, random_split


class UpstreamConvBlock(nn.Module):
    def __init__(self, cin, cout, bn):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=not bn)
        self.bn = nn.BatchNorm2d(cout) if bn else None
        self.bn_on = bn

    def forward(self, x):
        x = self.conv(x)
        return torch.relu(self.bn(x) if self.bn_on else x)


class SeedCNN5(nn.Module):
    """Upstream's mCNN with layers [1, 1, 1, 1]: a block per layer, pooling after layers 2 and 3."""

    def __init__(self, width, in_channels=3, classes=10, bn=False):
        super().__init__()
        self.pool, self.apool = nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1)
        widths = [in_channels, width, 2 * width, 4 * width, 8 * width]
        for i in range(4):
            setattr(self, f"layer{i + 1}", UpstreamConvBlock(widths[i], widths[i + 1], bn))
        self.fc = nn.Linear(8 * width, classes)

    def forward(self, x):
        x = self.pool(self.layer2(self.layer1(x)))
        x = self.layer4(self.pool(self.layer3(x)))
        return self.fc(torch.flatten(self.apool(x), 1))


class UpstreamBlock(nn.Module):
    def __init__(self, cin, cout, stride, downsample, bn):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(cout) if bn else None
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(cout) if bn else None
        self.downsample = downsample
        self.bn_on = bn

    def forward(self, x):
        out = self.conv1(x)
        out = torch.relu(self.bn1(out) if self.bn_on else out)
        out = self.conv2(out)
        out = self.bn2(out) if self.bn_on else out
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class UpstreamResNet(nn.Module):
    """Upstream's ResNetNoBN as compute_stats.py builds it (default weight_init, so no stem batch
    norm without the batch_norm addition); a stage's 1x1 shortcut (bias-free) is created before its
    first block."""

    def __init__(self, stages, width, in_channels=3, classes=10, bn=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(width) if bn else None
        self.bn_on = bn
        cin = width
        for i, n in enumerate(stages):
            cout, stride = width * 2**i, 1 if i == 0 else 2
            downsample = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))
                if stride != 1 or cin != cout
                else None
            )
            blocks = [UpstreamBlock(cin, cout, stride, downsample, bn)]
            blocks += [UpstreamBlock(cout, cout, 1, None, bn) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.conv1(x)
        x = torch.relu(self.bn1(x) if self.bn_on else x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def upstream_model(family, width, in_channels=3, classes=10, bn=False):
    if family == "cnn5":
        return SeedCNN5(width, in_channels, classes, bn)
    return UpstreamResNet(
        {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}[family],
        width,
        in_channels,
        classes,
        bn,
    )


def upstream_split(n, train_split, val_split, seed):
    """Indices of (train, val), by random_split as upstream calls it."""
    gen = torch.Generator("cpu").manual_seed(seed)
    train, val = random_split(range(n), (train_split, val_split), generator=gen)
    return list(train.indices), list(val.indices)


def upstream_corrupt(labels, noise, seed):
    """Upstream's corrupt_labels on a split's labels (in split order): the noisy labels."""
    rng = np.random.default_rng(seed)
    targets = torch.tensor(labels)
    k = targets.unique().shape[0]
    n = int(round(len(targets) * noise))
    offsets = torch.zeros_like(targets)
    offsets[:n] = torch.from_numpy(rng.integers(1, k, (n,)))
    offsets = offsets[torch.from_numpy(rng.permutation(offsets.shape[0]))]
    return ((targets + offsets) % k).tolist()


def upstream_sample_positions(n_split, batch_size, num_samples, skip=None, mc_sample_seed=4321):
    """Positions in the split upstream's stats sampler yields: a non-shuffling DataLoader, whole
    batches skipped until `skip` samples are passed, then num_samples / batch_size batches."""
    torch.manual_seed(mc_sample_seed)
    iterator = iter(
        DataLoader(Subset(range(n_split), range(n_split)), batch_size=batch_size, shuffle=False)
    )
    passed = 0
    while passed < (skip or 0):
        passed += len(next(iterator))
    return [int(i) for _ in range(num_samples // batch_size) for i in next(iterator)]


def upstream_random_images(dist, n, mean, std, shape=(3, 32, 32), seed=1234, num_classes=10):
    """Upstream's RandomDataset: (uint8 HWC images as its PIL images hold them, labels)."""
    from scipy.special import gammainc

    c, h, w = shape
    rng = np.random.default_rng(seed)
    mean, std = np.asarray(mean), np.asarray(std)
    if dist == "uniform":
        x = rng.uniform(low=mean - std, high=mean + std, size=(n * h * w, c))
    elif dist == "normal":
        x = rng.normal(loc=mean, scale=std, size=(n * h * w, c))
    else:
        x = rng.standard_normal(size=(n * h * w, c))
    x = np.vstack(tuple(x[:, i].reshape((-1, h, w)) for i in range(c)))
    x = x.reshape((c, -1, h, w)).transpose(1, 2, 3, 0)
    labels = rng.integers(low=0, high=num_classes, size=n)
    if dist == "hypersphere":
        x = x.transpose(0, 3, 1, 2).reshape((n * c, -1))
        ssq = np.sum(np.square(x), axis=1)
        d = h * w
        scale = gammainc(d / 2.0, ssq / 2.0) ** (1.0 / d) / np.sqrt(ssq)
        x = (
            np.multiply(x, np.tile(scale.reshape(n * c, 1), (1, d)))
            .reshape((n, c, h, w))
            .transpose(0, 2, 3, 1)
        )
    return (x * 255).astype(np.uint8), labels


def upstream_jitter(x, probability=0.66, lower=0.02, upper=0.98):
    """Upstream's JitterTransform as it runs, on a normalised image: thresholds, no noise."""
    x = x.clone()
    x[x >= probability] = upper
    x[x <= 1 - probability] = lower
    return x


# Every flag of upstream's core/cmd.py (both scripts), train.py and compute_stats.py, with a value
# its parser accepts (None: a switch).
UPSTREAM_COMMON_FLAGS = {
    "--device": "cpu",
    "--name": "n",
    "--save-dir": "s",
    "--data-dir": "d",
    "--workers": "0",
    "--data": "cifar10",
    "--model": "cnn5_4",
    "--model-additions": "batch_norm",
    "--batch-size": "128",
    "--augmentation": None,
    "--label-noise": "0.2",
    "--seed": "42",
    "--label-seed": "3",
    "--data-split-seed": "42",
    "--train-split": "49000",
    "--val-split": "1000",
    "--log-level": "info",
    "--logfile": "output.log",
    "--weight-decay": "0.0005",
    "--dropout": "0.0",
    "--l1-regularization": "0.0001",
    "--l2-regularization": "0.0001",
    "--random-dataset": "uniform",
}
UPSTREAM_TRAIN_FLAGS = {
    "--epochs": "300",
    "--learning-rate": "0.1",
    "--lr-step": "10",
    "--learning-rate-step": "10",
    "--optimizer": "sgd",
    "--momentum": "0.9",
    "--eval-every": "1",
    "--early-exit-accuracy": None,
    "--early-exit-loss": None,
    "--lr-decay-rate": "0.1",
    "--lr-warmup-epochs": "5",
    "--lr-warmup-initial": "0.001",
    "--stop-by-loss-threshold": "0.19",
    "--stop-by-accuracy-threshold": "0.9",
    "--resume-from": "3910",
    "--save-checkpoint": "10",
    "--accuracy-threshold": "1.0",
    "--loss-checkpoint": "382",
    "--raw-checkpoints": "1",
    "--weight-init": "nkaiming",
}
UPSTREAM_STATS_FLAGS = {
    "--gen-strategy": "none",
    "--metric": "jacobian_operator_norm",
    "--normalization": "jacobian",
    "--outname": "o",
    "--dataset-split": "train",
    "--bigmem": None,
    "--target-logit-only": None,
    "--num-samples": "1280",
    "--checkpoint": "1",
    "--checkpoint-by-step": None,
    "--nsteps-per-epoch": "382",
    "--skip": "1280",
    "--mc-sample-seed": "4321",
    "--num-power-iters": "10",
}
