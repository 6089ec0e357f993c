"""Datasets: read a source, split it, corrupt labels, write/read the prepared format, batch on device.

Sources
-------
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (offline), 1,797 images with
  values 0..16, stored as uint8 ``round(x * 255 / 16)`` of shape (N, 8, 8, 1), 10 classes.
  It has no official split, so we fix one: ``np.random.default_rng(0).permutation(1797)``;
  the first 1,297 samples of that permutation are the training set, the last 500 the test set.
  The source index of a sample is its index in ``load_digits`` order.
- ``cifar10`` / ``cifar100``: torchvision's on-disk python-pickle format under ``data_dir``
  (``cifar-10-batches-py/data_batch_1..5, test_batch``; ``cifar-100-python/train, test``,
  fine labels). The source index is the position in the original train (or test) file order.

Prepared format (a directory written by :func:`prepare`)
--------------------------------------------------------
``train.npz``, optionally ``val.npz``, ``test.npz``, each with ``images`` uint8 (N, H, W, C),
``labels`` int64 (noisy for train), ``clean_labels`` int64 and ``index`` int64 (source index);
and ``meta.json`` (see :func:`prepare`) whose ``content_hash`` pins the array bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .config import Config, ConfigError

DIGITS_N_TRAIN = 1297  # the remaining 500 digits are the test set
ARRAYS = ("images", "labels", "clean_labels", "index")  # fixed order for content_hash
PREPARE_HINT = "run `lipdd prepare` (or `dvc repro prepare`)"


class DataError(ConfigError):
    """A data problem the user can fix; the CLI prints it as one line and exits with status 2."""


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64, possibly noisy
    clean_labels: np.ndarray  # int64
    index: np.ndarray  # int64 index into the source's train (or test) set

    @property
    def corrupted(self) -> np.ndarray:
        return self.labels != self.clean_labels

    def take(self, idx) -> "Split":
        """The samples at positions `idx`, in that order."""
        return Split(*(getattr(self, a)[idx] for a in ARRAYS))


@dataclass
class Prepared:
    meta: dict
    splits: dict[str, Split]


# ----------------------------------------------------------------------------- sources


def _load_digits() -> tuple[Split, Split, int]:
    from sklearn.datasets import load_digits  # slow import, only needed here

    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(labels))
    train, test = perm[:DIGITS_N_TRAIN], perm[DIGITS_N_TRAIN:]
    return _split(images[train], labels[train], train), _split(images[test], labels[test], test), 10


def _read_cifar(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CIFAR python pickles: rows of 3072 bytes (R, G, B planes, each 32x32 row-major)."""
    data, labels = [], []
    for path in paths:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")  # the originals are Python 2 pickles
        # files written again by Python 3 have str keys, which torchvision reads too
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data.append(np.asarray(entry["data"], dtype=np.uint8))
        labels.extend(entry[label_key])
    images = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


def _ensure_cifar_verified(cls, name: str, data_dir: Path, folder: Path, files: list) -> None:
    """Make sure the original files are in `folder` with the right md5, downloading if any is missing."""
    from torchvision.datasets.utils import check_integrity

    without_check = "or pass --no-verify-checksums (verify_checksums: false) to read derived files without the md5 check"
    names = ", ".join(f for f, _ in files)
    if any(not (folder / f).is_file() for f, _ in files):
        try:
            cls(root=str(data_dir), train=True, download=True)
        except (
            Exception
        ) as e:  # any failure (no network, disk, bad archive) ends in the same manual fix
            raise DataError(
                f"{name} files are missing in {folder} and could not be downloaded ({type(e).__name__}): "
                f"extract {cls.url} into {data_dir} so that {folder} holds {names}; {without_check}"
            ) from e
    bad = [f for f, md5 in files if not check_integrity(str(folder / f), md5)]
    if bad:
        raise DataError(
            f"{name} files in {folder} fail the md5 checksum check ({', '.join(bad)}): "
            f"replace them with the originals from {cls.url}; {without_check}"
        )


def _load_cifar(data: str, data_dir: Path, verify_checksums: bool) -> tuple[Split, Split, int]:
    import torchvision.datasets as tvd  # slow import, only needed here

    cls, name, label_key, num_classes = {
        "cifar10": (tvd.CIFAR10, "CIFAR-10", "labels", 10),
        "cifar100": (tvd.CIFAR100, "CIFAR-100", "fine_labels", 100),
    }[data]
    folder = data_dir / cls.base_folder
    files = cls.train_list + cls.test_list
    if verify_checksums:
        _ensure_cifar_verified(cls, name, data_dir, folder, files)
    else:
        missing = [folder / f for f, _ in files if not (folder / f).is_file()]
        if missing:
            names = ", ".join(f for f, _ in files)
            raise DataError(
                f"{name} file {missing[0]} not found; put the python-format files {names} in {folder}"
            )
    out = []
    for files in (cls.train_list, cls.test_list):
        images, labels = _read_cifar([folder / f for f, _ in files], label_key)
        out.append(_split(images, labels, np.arange(len(labels))))
    return out[0], out[1], num_classes


def _split(images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> Split:
    return Split(images, labels, labels.copy(), index.astype(np.int64))


def _load_source(data: str, data_dir, verify_checksums: bool) -> tuple[Split, Split, int]:
    if data == "digits":
        return _load_digits()
    if data in ("cifar10", "cifar100"):
        return _load_cifar(data, Path(data_dir), verify_checksums)
    raise DataError(f"unknown data {data!r}; expected one of digits, cifar10, cifar100")


def _random_images(
    dist: str, n: int, shape: tuple, mean, std, num_classes: int, seed: int = 1234
) -> Split:
    """The seed's random datasets (core/random_dataset.py), drawn as it draws them with
    numpy.random.default_rng(seed): random_pixels, then labels uniform over the classes, drawn after
    the pixels; stored as the seed's PIL images hold them, uint8(x * 255)."""
    rng = np.random.default_rng(seed)
    x = random_pixels(dist, n, shape, mean, std, rng)
    labels = rng.integers(0, num_classes, n).astype(np.int64)
    images = (x.transpose(0, 2, 3, 1) * 255).astype(
        np.uint8
    )  # numpy's cast, wrapping as the seed's does
    return _split(images, labels, np.arange(n))


def random_pixels(
    dist: str, n: int, shape: tuple, mean, std, rng: np.random.Generator
) -> np.ndarray:
    """n random images (n, C, H, W) in pixel space, as the seed's random datasets draw them: every
    pixel uniform in [mean - std, mean + std] or normal(mean, std) per channel, or standard normal and
    then, per sample and channel, rescaled to a point uniform in the unit ball ("hypersphere")."""
    from scipy.special import gammainc  # slow import, only needed here

    h, w, c = shape
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if dist == "uniform":
        x = rng.uniform(low=mean - std, high=mean + std, size=(n * h * w, c))
    elif dist == "normal":
        x = rng.normal(loc=mean, scale=std, size=(n * h * w, c))
    elif dist == "hypersphere":
        x = rng.standard_normal(size=(n * h * w, c))
    else:
        raise ValueError(f"unknown random distribution {dist!r}")
    x = x.T.reshape(c, n, h, w).transpose(
        1, 0, 2, 3
    )  # channel-major, as the seed stacks its columns
    if dist == "hypersphere":
        flat = x.reshape(n * c, h * w)
        ssq = np.square(flat).sum(axis=1)
        x = (
            flat * (gammainc(h * w / 2, ssq / 2) ** (1 / (h * w)) / np.sqrt(ssq))[:, None]
        ).reshape(n, c, h, w)
    return x


def jitter(
    x: torch.Tensor, probability: float = 0.66, lower: float = 0.02, upper: float = 0.98
) -> torch.Tensor:
    """The seed's "jitter" random dataset as its JitterTransform runs on a normalised image: values
    >= 0.66 become 0.98, then values <= 0.34 become 0.02 (the noise it draws is never used)."""
    x = torch.where(x >= probability, torch.full_like(x, upper), x)
    return torch.where(x <= 1 - probability, torch.full_like(x, lower), x)


# ----------------------------------------------------------------------------- preparation


def corrupt_labels(
    labels: np.ndarray, num_classes: int, label_noise: float, seed: int | None
) -> np.ndarray:
    """The seed's `corrupt_labels`: with numpy.random.default_rng(seed), draw round(n * label_noise)
    offsets in 1..K-1, give them the first positions of an all-zero offset vector, shuffle that vector by
    a permutation from the same generator, and add it to the labels modulo K. (With K = 2 the offsets
    are all 1 and only the permutation is drawn.) The seed takes K from the classes present in the
    split; every class is present in any split of CIFAR or digits size."""
    if not 0 <= label_noise <= 1:
        raise DataError(f"label_noise={label_noise} must be in [0, 1]")
    n_corrupt = int(round(len(labels) * label_noise))
    noisy = labels.astype(np.int64)  # astype copies, so `labels` stays clean
    if n_corrupt == 0:
        return noisy
    rng = np.random.default_rng(seed)
    offsets = np.zeros(len(labels), dtype=np.int64)
    offsets[:n_corrupt] = 1 if num_classes == 2 else rng.integers(1, num_classes, n_corrupt)
    return (noisy + offsets[rng.permutation(len(labels))]) % num_classes


def _validation_split(train: Split, train_split, val_split, seed: int) -> dict[str, Split]:
    """The seed's split: torch.utils.data.random_split of the training set into (train_split,
    val_split) with a CPU generator seeded `seed`, i.e. the first train_split positions of
    torch.randperm(n) train and the next val_split validate. The seed needs train_split + val_split
    == n; a smaller sum leaves the rest of the permutation out."""
    n = len(train.labels)
    ts, vs = train_split or 0, val_split or 0
    if ts == 0 and vs == 0:
        return {"train": train}
    if ts <= 0 or vs <= 0 or ts + vs > n:
        raise DataError(
            f"train_split={train_split} and val_split={val_split}: give both as positive counts "
            f"with train_split + val_split <= {n} (the training set size), or neither"
        )
    perm = torch.randperm(n, generator=torch.Generator("cpu").manual_seed(seed)).numpy()
    return {"train": train.take(perm[:ts]), "val": train.take(perm[ts : ts + vs])}


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of images/255, without a float copy of the whole set (CIFAR: 1.2 GB)."""
    x = images.reshape(-1, images.shape[-1])
    # Sums of integers below 2**53 are exact in float64; only the final E[x^2] - E[x]^2 rounds (~1e-16).
    s = x.sum(0, dtype=np.float64)
    ss = np.einsum("ij,ij->j", x, x, dtype=np.float64, casting="unsafe")
    mean = s / len(x) / 255
    std = np.sqrt(np.maximum(ss / len(x) / 255**2 - mean**2, 0))
    return mean.tolist(), std.tolist()


# The seed's fixed normalisation constants (core/data.py), per channel of images / 255.
SEED_STATS = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2009, 0.1984, 0.2023]),
}


def input_stats(
    kind: str, data: str, source_train: Split, train: Split
) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) the inputs are normalised with. "fixed": constants of the dataset,
    the same for every split and noise level (the seed's for CIFAR; for digits, which the seed never
    had, those of its whole training set); "split": those of the training split as prepared."""
    if kind == "split":
        return _channel_stats(train.images)
    return SEED_STATS[data] if data in SEED_STATS else _channel_stats(source_train.images)


def content_hash(splits: dict[str, Split], mean: list[float], std: list[float]) -> str:
    """sha256 over each split (sorted by name): its name, then the raw bytes of its arrays in ARRAYS
    order; then the normalisation constants, which decide what the network sees as much as the bytes."""
    h = hashlib.sha256()
    h.update(json.dumps([mean, std]).encode())
    for name in sorted(splits):
        h.update(name.encode())
        for a in ARRAYS:
            h.update(np.ascontiguousarray(getattr(splits[name], a)).data)
    return h.hexdigest()


def prepare(
    out_dir,
    data: str,
    data_dir,
    verify_checksums: bool = True,
    label_noise: float = 0.0,
    label_seed: int = 0,
    train_split: int | None = 0,
    val_split: int | None = 0,
    data_split_seed: int = 42,
    stats: str = "fixed",
    random_dataset: str | None = None,
) -> dict:
    """Write the prepared dataset into `out_dir` (replacing it atomically) and return its meta."""
    train, test, num_classes = _load_source(data, data_dir, verify_checksums)
    if random_dataset in ("uniform", "normal", "hypersphere"):
        # drawn around the dataset's fixed statistics; the seed does not normalise the hypersphere
        mean, std = input_stats("fixed", data, train, train)
        shape = train.images.shape[1:]
        train, test = (
            _random_images(random_dataset, len(s.labels), shape, mean, std, num_classes)
            for s in (train, test)
        )
    splits = _validation_split(train, train_split, val_split, data_split_seed)
    tr = splits["train"]
    tr.labels = corrupt_labels(tr.clean_labels, num_classes, label_noise, label_seed)
    splits["test"] = test
    mean, std = input_stats(stats, data, train, tr)
    if random_dataset == "hypersphere" and stats == "fixed":
        mean, std = [0.0] * len(mean), [1.0] * len(std)
    meta = {
        "dataset": data,
        "num_classes": num_classes,
        "image_shape": list(tr.images.shape[1:]),
        "splits": {k: len(v.labels) for k, v in splits.items()},
        "mean": mean,
        "std": std,
        "input_stats": stats,
        "random_dataset": random_dataset,
        "label_noise": float(label_noise),
        "n_corrupted": int(tr.corrupted.sum()),
        "label_seed": label_seed,
        "data_split_seed": data_split_seed,
        "train_split": train_split or 0,
        "val_split": val_split or 0,
        "content_hash": content_hash(splits, mean, std),
    }

    # Write beside out_dir, then swap with renames: a killed prepare leaves the old data or none,
    # never a mix (load_prepared also refuses any mix through the content hash).
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    for d in (tmp, old):  # leftovers of an earlier run that had our pid
        shutil.rmtree(d, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, s in splits.items():
            np.savez(tmp / f"{name}.npz", **{a: getattr(s, a) for a in ARRAYS})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)  # only once the new data is in place
    return meta


def prepare_for(cfg: Config, path=None) -> dict:
    """`prepare` with the data parameters of `cfg` (into cfg.prepared_path by default)."""
    return prepare(
        path or cfg.prepared_path,
        cfg.data,
        cfg.data_dir,
        cfg.verify_checksums,
        cfg.label_noise,
        cfg.label_seed,
        cfg.train_split,
        cfg.val_split,
        cfg.data_split_seed,
        cfg.input_stats,
        cfg.random_dataset,
    )


def load_prepared(path, verify: bool = True) -> Prepared:
    """Read a directory written by `prepare`; with `verify`, refuse arrays that don't match meta.json."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"no prepared data in {path} ({meta_path} not found); {PREPARE_HINT}")
    meta = json.loads(meta_path.read_text())
    splits = {}
    for name in meta["splits"]:
        f = path / f"{name}.npz"
        try:
            with np.load(f) as z:
                splits[name] = Split(*(z[a] for a in ARRAYS))
        except (
            Exception
        ) as e:  # missing, truncated, bad CRC, missing array: all fixed by re-preparing
            raise DataError(f"cannot read {f} ({type(e).__name__}: {e}); {PREPARE_HINT}") from e
    if verify and content_hash(splits, meta.get("mean"), meta.get("std")) != meta["content_hash"]:
        raise DataError(
            f"prepared data in {path} does not match its meta.json content hash; re-run `lipdd prepare`"
        )
    return Prepared(meta, splits)


def ensure_prepared(cfg: Config, expected_hash: str | None = None) -> Prepared:
    """The prepared data `cfg` asks for, prepared now if needed, so `lipdd train` and `lipdd
    stats` also work without a separate prepare step (the seed scripts had none).

    `<prepared_dir>/<data>` is the pipeline's copy (a DVC output): used when its parameters
    match, created when missing, never overwritten here. Other parameters get a folder of
    their own beside it, so analysing an older run by hand leaves the pipeline's data alone.
    `expected_hash` (a run's dataset_hash) must match what is used."""
    wanted = dict(
        dataset=cfg.data,
        label_noise=float(cfg.label_noise),
        label_seed=cfg.label_seed,
        train_split=cfg.train_split,
        val_split=cfg.val_split,
        data_split_seed=cfg.data_split_seed,
        input_stats=cfg.input_stats,
        random_dataset=cfg.random_dataset,
    )
    path = cfg.prepared_path
    if path.exists() and not _matches(path, wanted):
        key = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:12]
        path = path.parent / f"{cfg.data}-{key}"
    if not _matches(path, wanted):
        print(f"preparing {cfg.data} in {path} (label_noise={cfg.label_noise:g})")
        prepare_for(cfg, path)
    prepared = load_prepared(path)
    if expected_hash and prepared.meta["content_hash"] != expected_hash:
        raise DataError(
            f"data: the prepared data in {path} (hash {prepared.meta['content_hash'][:12]}) is not "
            f"the data the run was trained on (hash {expected_hash[:12]}); the source files in "
            f"{cfg.data_dir} or the code that prepares them changed"
        )
    return prepared


def _matches(path: Path, wanted: dict) -> bool:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    return all(meta.get(k) == v for k, v in wanted.items())


# ----------------------------------------------------------------------------- on-device batches


def to_device(split: Split, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images as contiguous uint8 NCHW, labels and clean labels as int64, all on `device`."""
    # Move the uint8 HWC array first (4x less traffic than float), then permute on the device.
    images = torch.from_numpy(split.images).to(device).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(split.labels).to(device, torch.int64)
    clean = torch.from_numpy(split.clean_labels).to(device, torch.int64)
    return images, labels, clean


def normalize(images_u8: torch.Tensor, mean, std) -> torch.Tensor:
    """images/255, minus the per-channel mean, over the per-channel std (mean/std: lists or tensors)."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images_u8.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images_u8.device).view(1, -1, 1, 1)
    return (images_u8.float() / 255 - mean) / std


def random_crop_flip(
    images_u8: torch.Tensor, generator: torch.Generator, pad: int = 4
) -> torch.Tensor:
    """Random HxW crop of the zero-padded batch and a random horizontal flip, per sample, as one
    gather over the flattened padded pixels (faster than 4-way advanced indexing)."""
    n, c, h, w = images_u8.shape
    dev = images_u8.device
    padded = F.pad(images_u8, (pad, pad, pad, pad)).flatten(2)
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device=dev)
    flip = torch.rand(n, 1, 1, generator=generator, device=dev) < 0.5
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
      generator seeded with it (and augments from a second one, seeded seed + 1); `generators`
      are what a checkpoint saves to resume the very same stream.
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
    jitter: bool = False  # the seed's "jitter" random dataset, after normalisation

    def __post_init__(self):
        assert self.shard in (None, "batch", "blocks"), self.shard
        self.generators = (
            {}
            if self.seed is None
            else {
                "batches": torch.Generator().manual_seed(self.seed),
                "augment": torch.Generator(self.images.device).manual_seed(self.seed + 1),
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
