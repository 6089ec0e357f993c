import json
import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from cifar_fixture import write_cifar10, write_cifar100
from lipdd.data import Loader, Split, load_prepared, prepare
from lipdd.data.loader import normalize, random_crop_flip, to_device
from lipdd.data.prepared import UPSTREAM_STATS, _validation_split, content_hash, corrupt_labels
from lipdd.errors import DataError
from upstream_reference import (
    upstream_corrupt,
    upstream_jitter,
    upstream_random_images,
    upstream_split,
)


def prep(out, **kw):
    args = dict(data="digits", data_dir=None, verify_checksums=False, label_noise=0.0, label_seed=0)
    return prepare(out, **{**args, **kw})


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "digits"
    prep(out, label_noise=0.2, label_seed=3, train_split=1000, val_split=200, data_split_seed=7)
    return out


# ----------------------------------------------------------------------------- label noise


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
def test_corrupt_labels_exact_count_and_always_wrong(noise):
    clean = np.arange(1001) % 10
    noisy = corrupt_labels(clean, 10, noise, seed=0)
    assert noisy.dtype == np.int64 and (clean == np.arange(1001) % 10).all()  # input untouched
    changed = noisy != clean
    assert changed.sum() == round(noise * 1001)
    assert ((noisy >= 0) & (noisy < 10)).all()


def test_corrupt_labels_replacements_cover_other_classes():
    clean = np.zeros(5000, dtype=np.int64)
    noisy = corrupt_labels(clean, 10, 1.0, seed=1)
    counts = np.bincount(noisy, minlength=10)
    assert counts[0] == 0
    assert (counts[1:] > 5000 / 9 * 0.8).all()  # uniform over the 9 others


def test_corrupt_labels_seeded():
    clean = np.arange(500) % 7
    a, b = corrupt_labels(clean, 7, 0.3, 5), corrupt_labels(clean, 7, 0.3, 5)
    assert (a == b).all()
    assert (a != corrupt_labels(clean, 7, 0.3, 6)).any()


@pytest.mark.parametrize("noise", [-0.1, 1.5, float("nan")])
def test_corrupt_labels_rejects_bad_noise(noise):
    with pytest.raises(DataError, match="label_noise"):
        corrupt_labels(np.zeros(10, dtype=np.int64), 10, noise, 0)


# ------------------------------------------------------------------------ upstream's data, as facts


@pytest.mark.parametrize(
    "n, ts, vs, seed", [(1297, 1000, 297, 42), (100, 80, 20, 3), (50000, 49000, 1000, 42)]
)
def test_split_is_upstreams_random_split(n, ts, vs, seed):
    index = np.arange(n) + 7
    splits = _validation_split(
        Split(np.zeros((n, 1, 1, 1), np.uint8), index % 10, index % 10, index), ts, vs, seed
    )
    train, val = upstream_split(n, ts, vs, seed)
    assert splits["train"].index.tolist() == [i + 7 for i in train]
    assert splits["val"].index.tolist() == [i + 7 for i in val]


@pytest.mark.parametrize(
    "n, noise, seed", [(1000, 0.2, 0), (49000, 0.2, 42), (80, 0.5, 3), (333, 1.0, 9)]
)
def test_label_noise_is_upstreams(n, noise, seed):
    clean = np.random.default_rng(n).integers(0, 10, n)
    assert corrupt_labels(clean, 10, noise, seed).tolist() == upstream_corrupt(
        clean.tolist(), noise, seed
    )


def test_label_noise_two_classes_is_upstreams():
    clean = np.arange(101) % 2
    assert corrupt_labels(clean, 2, 0.3, 5).tolist() == upstream_corrupt(clean.tolist(), 0.3, 5)


def test_upstream_normalisation_constants(tmp_path):
    assert UPSTREAM_STATS["cifar10"] == ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
    assert UPSTREAM_STATS["cifar100"] == ([0.5071, 0.4865, 0.4409], [0.2009, 0.1984, 0.2023])
    write_cifar10(tmp_path / "raw", n_train_per_batch=20, n_test=10)
    fixed = prepare(
        tmp_path / "fixed", "cifar10", tmp_path / "raw", verify_checksums=False, label_noise=0.2
    )
    split = prepare(
        tmp_path / "split",
        "cifar10",
        tmp_path / "raw",
        verify_checksums=False,
        label_noise=0.2,
        stats="split",
    )
    assert (fixed["mean"], fixed["std"]) == UPSTREAM_STATS["cifar10"]
    assert split["mean"] != fixed["mean"] and split["content_hash"] != fixed["content_hash"]


def test_python3_pickles_read_like_the_originals(tmp_path):
    write_cifar10(tmp_path / "raw", n_train_per_batch=20, n_test=10)
    original = prepare(tmp_path / "a", "cifar10", tmp_path / "raw", verify_checksums=False)
    folder = tmp_path / "raw/cifar-10-batches-py"
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            entry = pickle.load(fh, encoding="bytes")
        with open(f, "wb") as fh:  # what Python 3 writes back: str keys
            pickle.dump({k.decode(): v for k, v in entry.items()}, fh)
    assert prepare(tmp_path / "b", "cifar10", tmp_path / "raw", verify_checksums=False) == original


# ----------------------------------------------------------------------------- prepare (digits)


def test_prepare_digits_with_val(digits_dir):
    p = load_prepared(digits_dir)
    assert set(p.splits) == {"train", "val", "test"}
    sizes = {k: len(s.labels) for k, s in p.splits.items()}
    assert sizes == {"train": 1000, "val": 200, "test": 500} == p.meta["splits"]
    for s in p.splits.values():
        assert s.images.dtype == np.uint8 and s.images.shape[1:] == (8, 8, 1)
        assert all(a.dtype == np.int64 for a in (s.labels, s.clean_labels, s.index))
    train, val, test = p.splits["train"], p.splits["val"], p.splits["test"]
    assert train.corrupted.sum() == round(0.2 * 1000) == p.meta["n_corrupted"]
    assert not val.corrupted.any() and not test.corrupted.any()

    # The documented fixed split: permutation with default_rng(0), first 1297 train, last 500 test.
    perm = np.random.default_rng(0).permutation(1797)
    assert (test.index == perm[1297:]).all()
    tv = np.concatenate([train.index, val.index])
    assert len(set(tv)) == 1200 and set(tv) <= set(perm[:1297])
    assert not set(tv) & set(test.index)

    digits = load_digits()
    for s in p.splits.values():
        assert (s.images[..., 0] == np.round(digits.images[s.index] * 255 / 16)).all()
        assert (s.clean_labels == digits.target[s.index]).all()
    assert train.images.max() == 255

    m = p.meta
    assert m["dataset"] == "digits" and m["num_classes"] == 10 and m["image_shape"] == [8, 8, 1]
    assert (m["label_noise"], m["label_seed"], m["data_split_seed"]) == (0.2, 3, 7)
    assert (m["train_split"], m["val_split"]) == (1000, 200)
    # "fixed" normalisation on digits: the statistics of its whole training set, whatever the split
    x = np.round(digits.images[perm[:1297]] * 255 / 16) / 255
    assert np.allclose(m["mean"], [x.mean()], rtol=1e-12) and np.allclose(
        m["std"], [x.std()], rtol=1e-12
    )
    assert m["input_stats"] == "fixed"
    assert m["content_hash"] == content_hash(p.splits, m["mean"], m["std"])
    text = (digits_dir / "meta.json").read_text()
    assert text == json.dumps(m, indent=2, sort_keys=True) + "\n"


def test_prepare_digits_without_val_is_stable(tmp_path):
    a = prep(tmp_path / "a", train_split=None, val_split=None)
    b = prep(tmp_path / "b", train_split=0, val_split=0)
    assert a["splits"] == {"train": 1297, "test": 500}
    assert a["content_hash"] == b["content_hash"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "meta.json",
        "test.npz",
        "train.npz",
    ]
    p = load_prepared(tmp_path / "a")
    perm = np.random.default_rng(0).permutation(1797)
    assert (p.splits["train"].index == perm[:1297]).all()


def test_prepare_replaces_previous_content(tmp_path):
    out = tmp_path / "d"
    prep(out, train_split=100, val_split=50)
    (out / "stale.txt").write_text("x")
    prep(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp dirs left behind
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.npz", "train.npz"]


def test_load_refuses_tampered_data(tmp_path, digits_dir):
    import shutil

    out = tmp_path / "d"
    shutil.copytree(digits_dir, out)
    with np.load(out / "val.npz") as z:
        arrays = dict(z)
    arrays["labels"][0] = (arrays["labels"][0] + 1) % 10
    np.savez(out / "val.npz", **arrays)
    with pytest.raises(DataError, match="does not match its meta.json content hash"):
        load_prepared(out)
    assert load_prepared(out, verify=False).splits["val"].corrupted.sum() == 1

    raw = bytearray((out / "test.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (out / "test.npz").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="lipdd prepare"):
        load_prepared(out, verify=False)


def test_load_missing(tmp_path):
    with pytest.raises(DataError, match="lipdd prepare"):
        load_prepared(tmp_path / "nope")


@pytest.mark.parametrize("ts, vs", [(100, 0), (0, 100), (None, 100), (1200, 200), (-5, 10)])
def test_prepare_bad_splits_write_nothing(tmp_path, ts, vs):
    with pytest.raises(DataError, match="train_split.*val_split"):
        prep(tmp_path / "d", train_split=ts, val_split=vs)
    assert list(tmp_path.iterdir()) == []


def test_prepare_bad_noise_writes_nothing(tmp_path):
    with pytest.raises(DataError, match="label_noise"):
        prep(tmp_path / "d", label_noise=1.2)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------- CIFAR through the real reader


def pixel(row, h, w, c):
    """Pixel (h, w, c) of a raw CIFAR row: planes R, G, B of 32x32 each, row-major."""
    return row[c * 1024 + h * 32 + w]


@pytest.mark.parametrize("data, writer", [("cifar10", write_cifar10), ("cifar100", write_cifar100)])
def test_cifar_reader(tmp_path, data, writer):
    raw = writer(tmp_path / "raw")
    meta = prep(tmp_path / "p", data=data, data_dir=tmp_path / "raw")
    p = load_prepared(tmp_path / "p")
    assert meta["num_classes"] == (10 if data == "cifar10" else 100)
    assert meta["image_shape"] == [32, 32, 3]
    for name in ("train", "test"):
        s, (rows, labels) = p.splits[name], raw[name]
        assert s.images.shape == (len(rows), 32, 32, 3)
        assert (s.index == np.arange(len(rows))).all()
        assert (s.labels == labels).all() and (s.clean_labels == labels).all()
        for i in (0, 7, len(rows) - 1):
            for h, w, c in [(0, 0, 0), (0, 1, 2), (5, 31, 1), (31, 0, 2), (17, 9, 0)]:
                assert s.images[i, h, w, c] == pixel(rows[i], h, w, c)
    if data == "cifar10":
        assert set(p.splits["train"].labels) == set(range(10))


def test_cifar_checksum_failure(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="checksum") as e:
        prep(tmp_path / "p", data="cifar10", data_dir=tmp_path, verify_checksums=True)
    assert "--no-verify-checksums" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    "data, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_cifar_missing_without_verify(tmp_path, data, folder):
    with pytest.raises(DataError, match=str(tmp_path / "nothing" / folder)):
        prep(tmp_path / "p", data=data, data_dir=tmp_path / "nothing")


# ----------------------------------------------------------------------------- on-device batches


def test_to_device_and_normalize(digits_dir):
    p = load_prepared(digits_dir)
    images, labels, clean = to_device(p.splits["val"], "cpu")
    assert images.dtype == torch.uint8 and images.shape == (200, 1, 8, 8) and images.is_contiguous()
    assert (images[:, 0].numpy() == p.splits["val"].images[..., 0]).all()
    assert labels.dtype == clean.dtype == torch.int64 and (labels == clean).all()

    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # (1, 2, 1, 2)
    y = normalize(x, [0.5, 0.2], [0.5, 0.1])
    assert y.dtype == torch.float32
    assert torch.allclose(y, torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]]))


def test_random_crop_flip_offsets_and_flips():
    n, h, w = 2000, 12, 10
    ones = torch.ones(n, 3, h, w, dtype=torch.uint8)
    out = random_crop_flip(ones, torch.Generator().manual_seed(0))
    assert out.shape == ones.shape and out.dtype == torch.uint8
    assert (out == out[:, :1]).all()  # channels cropped alike
    img = out[:, 0].bool()
    # The ones form a rectangle of size (h - |dy - 4|) x (w - |dx - 4|), against one edge per axis.
    rows, cols = img.any(2), img.any(1)
    n_rows, n_cols = rows.sum(1), cols.sum(1)
    assert (img.sum((1, 2)) == n_rows * n_cols).all()
    assert ((n_rows >= h - 4) & (n_cols >= w - 4)).all()
    assert ((rows[:, 0] | rows[:, -1]) & (cols[:, 0] | cols[:, -1])).all()
    assert (
        len(set(zip(n_rows.tolist(), n_cols.tolist()))) == 25
    )  # every |offset| pair 0..4 shows up


def test_random_crop_flip_flips_half_and_is_seeded():
    n = 4000
    ramp = torch.arange(8, dtype=torch.uint8).repeat(n, 1, 8, 1)  # (n, 1, 8, 8), values = column
    out = random_crop_flip(ramp, torch.Generator().manual_seed(1), pad=0)  # pad 0: pure flips
    flipped = (out == ramp.flip(3)).flatten(1).all(1)
    assert (flipped | (out == ramp).flatten(1).all(1)).all()
    assert abs(flipped.float().mean().item() - 0.5) < 0.05

    x = torch.randint(
        0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    a = random_crop_flip(x, torch.Generator().manual_seed(3))
    b = random_crop_flip(x, torch.Generator().manual_seed(3))
    c = random_crop_flip(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_crop_flip_outputs_are_padded_crops():
    # Each output must be one of the 9 x 9 x 2 crops/flips of its zero-padded input, computed by
    # slicing.
    x = torch.randint(
        1, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)
    )
    out = random_crop_flip(x, torch.Generator().manual_seed(6))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = []
    for i in range(32):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9)]
        matches = [
            f
            for crop in crops
            for f in (False, True)
            if torch.equal(out[i], crop.flip(2) if f else crop)
        ]
        assert len(matches) == 1
        flips += matches
    assert set(flips) == {False, True}


def test_split_corrupted_mask():
    s = Split(
        np.zeros((3, 1, 1, 1), np.uint8), np.array([0, 1, 2]), np.array([0, 2, 2]), np.arange(3)
    )
    assert s.corrupted.tolist() == [False, True, False]


def loader_of(digits_dir, **options):
    p = load_prepared(digits_dir)
    return Loader.of(p.splits["train"], p.meta, "cpu", **options), p


def test_loader_serves_the_split_in_order_normalised(digits_dir):
    loader, p = loader_of(digits_dir, batch_size=300)
    assert len(loader) == 4 and loader.sizes() == [300, 300, 300, 100]
    x, y = map(torch.cat, zip(*loader))
    images = torch.from_numpy(p.splits["train"].images).permute(0, 3, 1, 2)
    mean, std = p.meta["mean"][0], p.meta["std"][0]
    torch.testing.assert_close(x, ((images.double() / 255 - mean) / std).float())
    assert y.tolist() == p.splits["train"].labels.tolist()


def test_loader_order_and_augmentation_are_seeded_and_resumable(digits_dir):
    def epochs(loader, n):
        return [
            torch.cat([torch.cat([x.flatten(1), y[:, None].float()], 1) for x, y in loader])
            for _ in range(n)
        ]

    a, _ = loader_of(digits_dir, batch_size=128, seed=5, augment=True)
    b, _ = loader_of(digits_dir, batch_size=128, seed=5, augment=True)
    first = epochs(a, 2)
    assert not torch.equal(first[0], first[1])  # a fresh order every epoch
    assert torch.equal(epochs(b, 1)[0], first[0])
    # What a checkpoint saves after epoch 1 continues the same stream.
    c, _ = loader_of(digits_dir, batch_size=128, seed=5, augment=True)
    for k, g in c.generators.items():
        g.set_state(b.generators[k].get_state())
    assert torch.equal(epochs(c, 1)[0], first[1])


def test_the_loaders_generators_live_on_the_cpu_whatever_the_device(digits_dir):
    """A loader on another device (here "meta": shapes without values, as a CUDA loader's would
    be without a GPU) draws from CPU generators: it consumes the same stream as a CPU loader, and
    either's checkpointed state resumes the other."""
    p = load_prepared(digits_dir)
    cpu, _ = loader_of(digits_dir, batch_size=128, seed=5, augment=True)
    meta = Loader.of(p.splits["train"], p.meta, "meta", batch_size=128, seed=5, augment=True)
    assert meta.images.device.type == "meta"
    assert all(g.device.type == "cpu" for g in meta.generators.values())
    for loader in (cpu, meta):
        assert all(x.shape[1:] == (1, 8, 8) for x, _ in loader)
    for k, g in meta.generators.items():
        assert torch.equal(g.get_state(), cpu.generators[k].get_state()), k
    resumed, _ = loader_of(digits_dir, batch_size=128, seed=5, augment=True)
    for k, g in resumed.generators.items():
        g.set_state(meta.generators[k].get_state())
    expected = [x for x, _ in cpu]  # the epoch after the one both served
    assert all(torch.equal(a, b) for a, b in zip((x for x, _ in resumed), expected))


@pytest.mark.parametrize("world", [2, 3])
def test_loader_shards_are_one_process_batches(digits_dir, monkeypatch, world):
    """Under torchrun each rank takes its part of every augmented batch ("batch": DDP training) or a
    block of whole batches ("blocks": stats); the ranks together see exactly one process's
    batches."""
    for shard in ("batch", "blocks"):
        single = list(loader_of(digits_dir, batch_size=100, seed=1, augment=shard == "batch")[0])
        monkeypatch.setenv("WORLD_SIZE", str(world))
        parts = []
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            parts.append(
                list(
                    loader_of(
                        digits_dir, batch_size=100, seed=1, augment=shard == "batch", shard=shard
                    )[0]
                )
            )
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.delenv("RANK")
        if shard == "batch":
            joined = [tuple(map(torch.cat, zip(*batch))) for batch in zip(*parts)]
        else:
            joined = [batch for part in parts for batch in part]
        assert len(joined) == len(single) == 10
        for (x, y), (xs, ys) in zip(joined, single):
            assert torch.equal(x, xs) and torch.equal(y, ys)


@pytest.mark.parametrize("dist", ["uniform", "normal", "hypersphere"])
def test_random_datasets_are_the_seeds(tmp_path, dist):
    write_cifar10(tmp_path / "raw", n_train_per_batch=20, n_test=10)
    meta = prepare(
        tmp_path / dist, "cifar10", tmp_path / "raw", verify_checksums=False, random_dataset=dist
    )
    p = load_prepared(tmp_path / dist)
    mean, std = UPSTREAM_STATS["cifar10"] if dist != "hypersphere" else ([0.0] * 3, [1.0] * 3)
    for split, n in (("train", 100), ("test", 10)):
        images, labels = upstream_random_images(dist, n, *UPSTREAM_STATS["cifar10"])
        assert (
            np.array_equal(p.splits[split].images, images)
            and p.splits[split].clean_labels.tolist() == labels.tolist()
        )
    assert (meta["mean"], meta["std"], meta["random_dataset"]) == (mean, std, dist)


def test_jitter_is_upstreams_threshold_after_normalisation(tmp_path):
    write_cifar10(tmp_path / "raw", n_train_per_batch=20, n_test=10)
    prepare(
        tmp_path / "j", "cifar10", tmp_path / "raw", verify_checksums=False, random_dataset="jitter"
    )
    p = load_prepared(tmp_path / "j")
    split = p.splits["train"]
    ((x, _),) = Loader.of(split, p.meta, "cpu", 100)
    plain = normalize(
        torch.from_numpy(split.images).permute(0, 3, 1, 2), *UPSTREAM_STATS["cifar10"]
    )
    assert torch.equal(x, upstream_jitter(plain)) and not torch.equal(x, plain)
