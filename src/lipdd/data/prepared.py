"""The prepared format, which training and stats read alone: a source split into train / val /
test, labels corrupted, normalisation constants fixed, written atomically, checked on load.

Prepared format (a directory written by :func:`prepare`)
--------------------------------------------------------
``train.npz``, optionally ``val.npz``, ``test.npz``, each with ``images`` uint8 (N, H, W, C),
``labels`` int64 (noisy for train), ``clean_labels`` int64 and ``index`` int64 (source index);
and ``meta.json`` (see :func:`prepare`) whose ``content_hash`` pins the array bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import files
from ..config import Config
from ..errors import DataError
from .sources import ARRAYS, Split, load_source, random_images

PREPARE_HINT = "run `lipdd prepare` (or `dvc repro prepare`)"


@dataclass
class Prepared:
    meta: dict
    splits: dict[str, Split]


def draw_label_seed() -> int:
    """A fresh label_seed for a run given none (upstream's default: fresh randomness), said aloud so
    the labels can be corrupted the same way again; lipdd logs it with the run."""
    seed = int(np.random.SeedSequence().generate_state(1)[0])
    print(f"label_seed: drew {seed} (pass --label-seed={seed} to corrupt the same labels again)")
    return seed


def corrupt_labels(
    labels: np.ndarray, num_classes: int, label_noise: float, seed: int | None
) -> np.ndarray:
    """Upstream's `corrupt_labels`: with numpy.random.default_rng(seed), draw round(n * label_noise)
    offsets in 1..K-1, give them the first positions of an all-zero offset vector, shuffle that
    vector by a permutation from the same generator, and add it to the labels modulo K. (With K = 2
    the offsets are all 1 and only the permutation is drawn.) Upstream takes K from the classes
    present in the split; every class is present in any split of CIFAR or digits size."""
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
    """Upstream's split: torch.utils.data.random_split of the training set into (train_split,
    val_split) with a CPU generator seeded `seed`, i.e. the first train_split positions of
    torch.randperm(n) train and the next val_split validate. Upstream needs train_split + val_split
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
    # Sums of integers below 2**53 are exact in float64; only the final E[x^2] - E[x]^2 rounds
    # (~1e-16).
    s = x.sum(0, dtype=np.float64)
    ss = np.einsum("ij,ij->j", x, x, dtype=np.float64, casting="unsafe")
    mean = s / len(x) / 255
    std = np.sqrt(np.maximum(ss / len(x) / 255**2 - mean**2, 0))
    return mean.tolist(), std.tolist()


# Upstream's fixed normalisation constants (core/data.py), per channel of images / 255.
UPSTREAM_STATS = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2009, 0.1984, 0.2023]),
}


def input_stats(
    kind: str, data: str, source_train: Split, train: Split
) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) the inputs are normalised with. "fixed": constants of the dataset,
    the same for every split and noise level (upstream's for CIFAR; for digits, which upstream never
    had, those of its whole training set); "split": those of the training split as prepared."""
    if kind == "split":
        return _channel_stats(train.images)
    return UPSTREAM_STATS[data] if data in UPSTREAM_STATS else _channel_stats(source_train.images)


def content_hash(splits: dict[str, Split], mean: list[float], std: list[float]) -> str:
    """sha256 over each split (sorted by name): its name, then the raw bytes of its arrays in ARRAYS
    order; then the normalisation constants, which decide what the network sees as much as the
    bytes."""
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
    train, test, num_classes = load_source(data, data_dir, verify_checksums)
    if random_dataset in ("uniform", "normal", "hypersphere"):
        # drawn around the dataset's fixed statistics; upstream does not normalise the hypersphere
        mean, std = input_stats("fixed", data, train, train)
        shape = train.images.shape[1:]
        train, test = (
            random_images(random_dataset, len(s.labels), shape, mean, std, num_classes)
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

    # load_prepared also refuses any mix of old and new arrays, through the content hash.
    with files.replacing(out_dir) as tmp:
        tmp.mkdir()
        for name, s in splits.items():
            np.savez(tmp / f"{name}.npz", **{a: getattr(s, a) for a in ARRAYS})
        files.write_json(tmp / "meta.json", meta)
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
    """Read a directory written by `prepare`; with `verify`, refuse arrays that don't match
    meta.json."""
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
            f"prepared data in {path} does not match its meta.json content hash; re-run `lipdd "
            "prepare`"
        )
    return Prepared(meta, splits)


def ensure_prepared(cfg: Config, expected_hash: str | None = None) -> Prepared:
    """The prepared data `cfg` asks for, prepared now if needed, so `lipdd train` and `lipdd
    stats` also work without a separate prepare step (the upstream scripts had none).

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
            f"data: the prepared data in {path} (hash {prepared.meta['content_hash'][:12]}) is "
            f"not the data the run was trained on (hash {expected_hash[:12]}); the source files "
            f"in {cfg.data_dir} or the code that prepares them changed"
        )
    return prepared


def _matches(path: Path, wanted: dict) -> bool:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    return all(meta.get(k) == v for k, v in wanted.items())
