"""A prepared split resident on the training device, served in normalised, augmented batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import distributed
from .sources import Split


def jitter(
    x: torch.Tensor, probability: float = 0.66, lower: float = 0.02, upper: float = 0.98
) -> torch.Tensor:
    """Upstream's "jitter" random dataset as its JitterTransform runs on a normalised image: values
    >= 0.66 become 0.98, then values <= 0.34 become 0.02 (the noise it draws is never used)."""
    x = torch.where(x >= probability, torch.full_like(x, upper), x)
    return torch.where(x <= 1 - probability, torch.full_like(x, lower), x)


def to_device(split: Split, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images as contiguous uint8 NCHW, labels and clean labels as int64, all on `device`."""
    # Move the uint8 HWC array first (4x less traffic than float), then permute on the device.
    images = torch.from_numpy(split.images).to(device).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(split.labels).to(device, torch.int64)
    clean = torch.from_numpy(split.clean_labels).to(device, torch.int64)
    return images, labels, clean


def normalize(images_u8: torch.Tensor, mean, std) -> torch.Tensor:
    """images/255, minus the per-channel mean, over the per-channel std (mean/std: lists or
    tensors)."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images_u8.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images_u8.device).view(1, -1, 1, 1)
    return (images_u8.float() / 255 - mean) / std


def random_crop_flip(
    images_u8: torch.Tensor, generator: torch.Generator, pad: int = 4
) -> torch.Tensor:
    """Random HxW crop of the zero-padded batch and a random horizontal flip, per sample, as one
    gather over the flattened padded pixels (faster than 4-way advanced indexing). The offsets
    are drawn by a CPU generator whatever the device (3n numbers, one copy): CPU and CUDA
    generators give different streams, and a checkpoint's generator state must resume on either."""
    n, c, h, w = images_u8.shape
    dev = images_u8.device
    padded = F.pad(images_u8, (pad, pad, pad, pad)).flatten(2)
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator).to(dev)
    flip = (torch.rand(n, 1, 1, generator=generator) < 0.5).to(dev)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    cols = (
        torch.where(flip, cols.flip(2), cols) + dx
    )  # flipping the crop = reading its columns backwards
    rows = torch.arange(h, device=dev).view(1, h, 1) + dy
    index = (rows * (w + 2 * pad) + cols).view(n, 1, h * w).expand(n, c, h * w)
    return padded.gather(2, index).view(n, c, h, w)


@dataclass
class Loader:
    """A split resident on the device, served in normalised float batches `(x, y)`.

    Images stay uint8 on the device (4x less memory than float); each batch is gathered, augmented
    and normalised there, so no per-sample Python or PIL work runs in the loop.
    - seed: None serves the split in order; an int draws a fresh permutation every epoch from a
      generator seeded with it (and augments from a second one, seeded seed + 1); `generators`,
      both on the CPU whatever the device, are what a checkpoint saves to resume the very same
      stream, on a CPU or a GPU.
    - shard, under torchrun: "batch" gives each rank its part of every batch, after the whole
      batch is augmented, so the ranks together train on one process's batches (DDP); "blocks"
      a contiguous block of whole batches (stats); None every batch (rank 0's evaluation).
    - channels_last: the layout convolutions run fastest in (oneDNN, cuDNN).
    `dataclasses.replace(loader, ...)` makes another loader over the same device tensors."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64, as trained on (noisy)
    clean_labels: torch.Tensor
    mean: torch.Tensor  # float32 (C,)
    std: torch.Tensor
    batch_size: int
    seed: int | None = None
    augment: bool = False
    shard: str | None = None
    channels_last: bool = False
    jitter: bool = False  # upstream's "jitter" random dataset, after normalisation

    def __post_init__(self):
        assert self.shard in (None, "batch", "blocks"), self.shard
        self.generators = (
            {}
            if self.seed is None
            else {
                "batches": torch.Generator().manual_seed(self.seed),
                "augment": torch.Generator().manual_seed(self.seed + 1),
            }
        )

    @classmethod
    def of(cls, split: Split, meta: dict, device, batch_size: int, **options) -> "Loader":
        mean, std = (torch.tensor(meta[k], device=device) for k in ("mean", "std"))
        options.setdefault("jitter", meta.get("random_dataset") == "jitter")
        return cls(*to_device(split, device), mean, std, batch_size, **options)

    def sizes(self) -> list[int]:
        """Every batch's size (whole batches, before any shard)."""
        n, b = len(self.labels), self.batch_size
        return [min(b, n - i) for i in range(0, n, b)]

    def __len__(self) -> int:
        return len(self.sizes())

    def __iter__(self):
        n, b = len(self.labels), self.batch_size
        starts = range(0, n, b)
        if self.shard == "blocks":
            starts = starts[distributed.part(len(starts))]
        order = None
        if self.seed is not None:
            order = torch.randperm(n, generator=self.generators["batches"]).to(self.images.device)
        for i in starts:
            if order is None:
                x, y = self.images[i : i + b], self.labels[i : i + b]
            else:
                idx = order[i : i + b]
                x, y = self.images[idx], self.labels[idx]
            if self.augment:
                x = random_crop_flip(x, self.generators["augment"])
            if self.shard == "batch":
                mine = distributed.part(len(y))
                x, y = x[mine], y[mine]
            x = normalize(x, self.mean, self.std)
            if self.jitter:
                x = jitter(x)
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y
