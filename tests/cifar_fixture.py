"""Tiny CIFAR-10/100 files in the real on-disk python-pickle format, for tests that must not
download.

The pickles are dicts with byte-string keys, as the originals read with ``encoding="bytes"``:
``b"data"`` uint8 (N, 3072) rows holding the R, G, B planes (each 32x32 row-major) one after
another. Their md5 sums differ from the real ones, so read them with ``verify_checksums=False``.
Each writer returns ``{"train": (data, labels), "test": (data, labels)}`` with the raw rows, in
file order, so tests can check the loader against the on-disk layout.
"""

import pickle
from pathlib import Path

import numpy as np

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _rows_and_labels(rng, n, num_classes):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    # Every class appears when n >= num_classes, in a shuffled order.
    labels = rng.permutation(np.arange(n) % num_classes)
    return data, labels


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root, n_train_per_batch=20, n_test=30, seed=0):
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    parts = {"train": [], "test": []}
    files = [
        (f"data_batch_{i}", f"training batch {i} of 5", n_train_per_batch, "train")
        for i in range(1, 6)
    ]
    for fname, batch_label, n, split in files + [
        ("test_batch", "testing batch 1 of 1", n_test, "test")
    ]:
        data, labels = _rows_and_labels(rng, n, 10)
        _dump(
            folder / fname,
            {
                b"batch_label": batch_label.encode(),
                b"labels": labels.tolist(),
                b"data": data,
                b"filenames": [f"{fname}_{j:05d}.png".encode() for j in range(n)],
            },
        )
        parts[split].append((data, labels))
    names = [s.encode() for s in CIFAR10_NAMES]
    _dump(
        folder / "batches.meta",
        {b"num_cases_per_batch": n_train_per_batch, b"label_names": names, b"num_vis": 3072},
    )
    return {
        k: (np.concatenate([d for d, _ in v]), np.concatenate([labels for _, labels in v]))
        for k, v in parts.items()
    }


def write_cifar100(root, n_train=50, n_test=30, seed=0):
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for fname, n in (("train", n_train), ("test", n_test)):
        data, fine = _rows_and_labels(rng, n, 100)
        _dump(
            folder / fname,
            {
                b"filenames": [f"{fname}_{j:05d}.png".encode() for j in range(n)],
                b"batch_label": f"{fname}ing batch 1 of 1".encode(),
                b"fine_labels": fine.tolist(),
                b"coarse_labels": (
                    fine // 5
                ).tolist(),  # 20 superclasses; the mapping is not the real one
                b"data": data,
            },
        )
        out[fname] = (data, fine)
    _dump(
        folder / "meta",
        {
            b"fine_label_names": [f"class_{i:02d}".encode() for i in range(100)],
            b"coarse_label_names": [f"superclass_{i:02d}".encode() for i in range(20)],
        },
    )
    return out
