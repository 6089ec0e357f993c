"""Where images come from: the sources a prepared dataset is made of, and upstream's random
datasets.

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
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

DIGITS_N_TRAIN = 1297  # the remaining 500 digits are the test set
ARRAYS = ("images", "labels", "clean_labels", "index")  # fixed order for content_hash


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


def _load_digits() -> tuple[Split, Split, int]:
    # The file scikit-learn's load_digits reads, read as it reads it (rows of 64 pixels and the
    # label) but without importing scikit-learn and SciPy, which would take longer than the rest.
    sklearn = importlib.util.find_spec("sklearn")
    path = Path(sklearn.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",")
    images = np.round(rows[:, :-1].reshape(-1, 8, 8) * 255 / 16).astype(np.uint8)[..., None]
    labels = rows[:, -1].astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(labels))
    train, test = perm[:DIGITS_N_TRAIN], perm[DIGITS_N_TRAIN:]
    return _split(images[train], labels[train], train), _split(images[test], labels[test], test), 10


def _read_cifar(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CIFAR python pickles: rows of 3072 bytes (R, G, B planes, each 32x32
    row-major)."""
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
    """Make sure the original files are in `folder` with the right md5, downloading if any is
    missing."""
    from torchvision.datasets.utils import check_integrity

    without_check = (
        "or pass --no-verify-checksums (verify_checksums: false) to read derived files without "
        "the md5 check"
    )
    names = ", ".join(f for f, _ in files)
    if any(not (folder / f).is_file() for f, _ in files):
        try:
            cls(root=str(data_dir), train=True, download=True)
        except (
            Exception
        ) as e:  # any failure (no network, disk, bad archive) ends in the same manual fix
            raise DataError(
                f"{name} files are missing in {folder} and could not be downloaded "
                f"({type(e).__name__}): extract {cls.url} into {data_dir} so that {folder} holds "
                f"{names}; {without_check}"
            ) from e
    bad = [f for f, md5 in files if not check_integrity(str(folder / f), md5)]
    if bad:
        raise DataError(
            f"{name} files in {folder} fail the md5 checksum check ({', '.join(bad)}): replace "
            f"them with the originals from {cls.url}; {without_check}"
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
                f"{name} file {missing[0]} not found; put the python-format files {names} in "
                f"{folder}"
            )
    out = []
    for files in (cls.train_list, cls.test_list):
        images, labels = _read_cifar([folder / f for f, _ in files], label_key)
        out.append(_split(images, labels, np.arange(len(labels))))
    return out[0], out[1], num_classes


def _split(images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> Split:
    return Split(images, labels, labels.copy(), index.astype(np.int64))


def load_source(data: str, data_dir, verify_checksums: bool) -> tuple[Split, Split, int]:
    if data == "digits":
        return _load_digits()
    if data in ("cifar10", "cifar100"):
        return _load_cifar(data, Path(data_dir), verify_checksums)
    raise DataError(f"unknown data {data!r}; expected one of digits, cifar10, cifar100")


def random_images(
    dist: str, n: int, shape: tuple, mean, std, num_classes: int, seed: int = 1234
) -> Split:
    """Upstream's random datasets (core/random_dataset.py), drawn as it draws them with
    numpy.random.default_rng(seed): random_pixels, then labels uniform over the classes, drawn after
    the pixels; stored as upstream's PIL images hold them, uint8(x * 255)."""
    rng = np.random.default_rng(seed)
    x = random_pixels(dist, n, shape, mean, std, rng)
    labels = rng.integers(0, num_classes, n).astype(np.int64)
    images = (x.transpose(0, 2, 3, 1) * 255).astype(
        np.uint8
    )  # numpy's cast, wrapping as upstream's does
    return _split(images, labels, np.arange(n))


def random_pixels(
    dist: str, n: int, shape: tuple, mean, std, rng: np.random.Generator
) -> np.ndarray:
    """n random images (n, C, H, W) in pixel space, as upstream's random datasets draw them: every
    pixel uniform in [mean - std, mean + std] or normal(mean, std) per channel, or standard normal
    and then, per sample and channel, rescaled to a point uniform in the unit ball ("hypersphere").
    """
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
    )  # channel-major, as upstream stacks its columns
    if dist == "hypersphere":
        flat = x.reshape(n * c, h * w)
        ssq = np.square(flat).sum(axis=1)
        x = (
            flat * (gammainc(h * w / 2, ssq / 2) ** (1 / (h * w)) / np.sqrt(ssq))[:, None]
        ).reshape(n, c, h, w)
    return x
