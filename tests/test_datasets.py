"""build_dataset against tiny files written in the real on-disk formats."""

from __future__ import annotations

import ast
import graphlib
import io
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import scipy.io
import torch
from conftest import check_determinism, contains, deny, shifted_crops
from data_helpers import IMAGENET_MEAN, IMAGENET_STD, norm, random_images, write_jpeg_tree
from PIL import Image
from torch.utils.data import DataLoader

import imnet.data
from imnet.data import transforms as tf
from imnet.data.core import DataError, DatasetInfo
from imnet.data.datasets import NAMES, build_dataset

MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_STATS = ((0.2860,), (0.3530,))
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))


# ------------------------------------------------------------------------------- file writers


def write_idx(folder: str, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """idx3 (magic 2051) images and idx1 (magic 2049) labels, big-endian header, uncompressed."""
    os.makedirs(folder, exist_ok=True)
    n, h, w = images.shape
    with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as fh:
        fh.write(struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes())
    with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as fh:
        fh.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


def make_mnist(root, folder="MNIST", n_train=7, n_val=3):
    """Returns {split: (images (N, 28, 28), labels)}."""
    raw = os.path.join(root, folder, "raw")
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("val", "t10k", n_val)):
        images = random_images(n, 1, 28, 28, seed=n)[:, 0]
        labels = np.arange(n) % 10
        write_idx(raw, prefix, images, labels)
        out[split] = (images, labels)
    return out


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 strings (SHORT_BINSTRING / BINSTRING), as cPickle did."""

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch: ClassVar[dict] = {**pickle._Pickler.dispatch, str: save_py2_str, bytes: save_py2_str}


def dump_py2(obj, fh) -> None:
    """`obj` pickled like the real CIFAR-10 files: Python 2 cPickle, protocol 2, numpy 1 names."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    fh.write(buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def make_cifar(root, per_batch=2, n_val=3, py2=False):
    """Five train batches + test batch + meta, as pickled dicts; returns NCHW arrays per split.
    py2: pickled as the real files are (Python 2 strings), else by this Python (protocol 4)."""
    dump = dump_py2 if py2 else pickle.dump
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    out = {"train": ([], [])}
    for i in range(1, 6):
        images = random_images(per_batch, 3, 32, 32, seed=i)
        labels = [(i * per_batch + j) % 10 for j in range(per_batch)]
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as fh:
            # Row = 1024 red, 1024 green, 1024 blue values, each plane row-major (the CIFAR format).
            dump({"data": images.reshape(per_batch, 3072), "labels": labels, "batch_label": f"b{i}"}, fh)
        out["train"][0].append(images)
        out["train"][1].extend(labels)
    out["train"] = (np.concatenate(out["train"][0]), out["train"][1])
    images = random_images(n_val, 3, 32, 32, seed=99)
    labels = [9, 0, 4][:n_val]
    with open(os.path.join(folder, "test_batch"), "wb") as fh:
        dump({"data": images.reshape(n_val, 3072), "labels": labels}, fh)
    out["val"] = (images, labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as fh:
        dump({"label_names": [f"class{k}" for k in range(10)], "num_cases_per_batch": per_batch}, fh)
    return out


def make_svhn(root, train_labels=(10, 1, 5, 10, 9)):
    """train_32x32.mat / test_32x32.mat with X (32, 32, 3, N) and y (N, 1) in 1..10 (10 = digit 0)."""
    out = {}
    for split, fname, y in (("train", "train_32x32.mat", list(train_labels)), ("val", "test_32x32.mat", [3, 10])):
        images = random_images(len(y), 3, 32, 32, seed=len(y))  # NCHW
        x = np.ascontiguousarray(images.transpose(2, 3, 1, 0))  # -> H, W, C, N as in the .mat files
        scipy.io.savemat(os.path.join(root, fname), {"X": x, "y": np.array(y, dtype=np.uint8)[:, None]})
        out[split] = (images, [0 if v == 10 else v for v in y])
    return out


IMAGENET_COLORS = {"n01440764": (200, 30, 40), "n01443537": (20, 180, 60), "n01484850": (40, 50, 220)}


def make_imagenet(root, classes=IMAGENET_COLORS, per_class=(3, 2)):
    """root/{train,val}/<wnid>/*.JPEG, each image one solid color per class (survives JPEG exactly)."""
    colors = list(classes.values())
    write_jpeg_tree(root, list(classes), dict(zip(("train", "val"), per_class)),
                    lambda split, c, k: Image.new("RGB", (40 + 4 * k, 30), colors[c]))


# ----------------------------------------------------------------------------- MNIST / Fashion


@pytest.mark.parametrize("name,folder,stats", [
    ("mnist", "MNIST", MNIST_STATS),
    ("fashion", "FashionMNIST", FASHION_STATS),
])
def test_mnist_like_exact(tmp_path, name, folder, stats):
    data = make_mnist(tmp_path, folder)
    for split in ("train", "val"):
        ds, info = build_dataset(name, str(tmp_path), split, augment=False)
        images, labels = data[split]
        assert info == DatasetInfo(10, 1, 28, stats[0], stats[1])
        assert len(ds) == len(labels)
        assert ds.targets.tolist() == labels.tolist()
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
            assert isinstance(y, int) and y == labels[i]
        x, _ = ds[2]
        for r, c in ((0, 0), (5, 17), (27, 3)):  # row, column as written in the idx file
            assert x[0, r, c].item() == pytest.approx(norm(images[2, r, c], *(s[0] for s in stats)), abs=1e-5)


def test_mnist_augmentation_crops_without_flip(tmp_path):
    make_mnist(tmp_path)
    plain, _ = build_dataset("mnist", str(tmp_path), "train", augment=False)
    ds, _ = build_dataset("mnist", str(tmp_path), "train", augment=True)
    mean, std = MNIST_STATS[0][0], MNIST_STATS[1][0]
    raw = ds.images[1]
    crops = [ds.normalize(c) for c in shifted_crops(raw, 4)]
    outs = check_determinism(ds, index=1, seeds=range(30))
    for out in outs:
        assert contains(crops, out), "an augmented MNIST image is not a plain 4-px shifted crop (flipped?)"
        assert out.min() >= norm(0, mean, std) - 1e-6 and out.max() <= norm(255, mean, std) + 1e-6
    assert torch.equal(ds[1][0], plain[1][0]), "an int key must give the un-augmented image"
    assert torch.equal(plain[(1, 7)][0], plain[1][0]), "augment=False must ignore the seed"
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_image_size_override_resizes_once(tmp_path):
    make_mnist(tmp_path)
    ds, info = build_dataset("mnist", str(tmp_path), "val", augment=False, image_size=32)
    assert info.image_size == 32 and ds[0][0].shape == (1, 32, 32) and ds.images.shape == (3, 1, 32, 32)


def test_corrupt_file_is_reported(tmp_path):
    make_mnist(tmp_path)
    path = os.path.join(tmp_path, "MNIST", "raw", "train-images-idx3-ubyte")
    with open(path, "r+b") as fh:
        fh.truncate(100)  # a half-written download
    with pytest.raises(DataError, match="re-download"):  # one line the trainer prints, not a traceback
        build_dataset("mnist", str(tmp_path), "train", augment=False)


def test_mnist_label_out_of_range(tmp_path):
    data = make_mnist(tmp_path)
    images, labels = data["train"]
    labels[3] = 200
    raw = os.path.join(tmp_path, "MNIST", "raw")
    write_idx(raw, "train", images, labels)
    with pytest.raises(DataError) as err:
        build_dataset("mnist", str(tmp_path), "train", augment=False)
    assert str(err.value) == f"{raw}/train-labels-idx1-ubyte: label 200 at index 3 is outside 0..9"
    assert len(build_dataset("mnist", str(tmp_path), "val", augment=False)[0]) == 3  # the other split is fine
    with open(os.path.join(raw, "train-labels-idx1-ubyte"), "wb") as fh:  # a whole file of another download
        fh.write(struct.pack(">II", 2049, 5) + bytes(range(5)))
    with pytest.raises(DataError) as err:
        build_dataset("mnist", str(tmp_path), "train", augment=False)
    assert str(err.value) == f"{raw}/train-labels-idx1-ubyte: 5 labels for the 7 images of train-images-idx3-ubyte"


# ------------------------------------------------------------------------------------- CIFAR-10


def test_cifar10_reads_python2_pickles(tmp_path):
    # The real files: Python 2 cPickle strings and numpy.core.multiarray._reconstruct.
    data = make_cifar(tmp_path, py2=True)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        assert b"cnumpy.core.multiarray\n_reconstruct" in fh.read()
    for split in ("train", "val"):
        ds, _ = build_dataset("cifar10", str(tmp_path), split, augment=False)
        images, labels = data[split]
        assert torch.equal(ds.images, torch.from_numpy(images)) and ds.targets.tolist() == list(labels)


def test_cifar10_label_out_of_range(tmp_path):
    make_cifar(tmp_path)
    path = os.path.join(tmp_path, "cifar-10-batches-py", "data_batch_2")
    with open(path, "wb") as fh:
        pickle.dump({"data": random_images(2, 3, 32, 32, seed=0).reshape(2, 3072), "labels": [3, 200]}, fh)
    with pytest.raises(DataError) as err:
        build_dataset("cifar10", str(tmp_path), "train", augment=False)
    assert str(err.value) == f"{path}: label 200 at index 1 is outside 0..9"


class _Evil:
    """A pickle whose loading opens (creates) a file: what a crafted data file could do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return open, (self.target, "w")


def test_cifar10_crafted_pickle_runs_nothing(tmp_path):
    make_cifar(tmp_path)
    path = os.path.join(tmp_path, "cifar-10-batches-py", "test_batch")
    target = tmp_path / "created"
    with open(path, "wb") as fh:
        pickle.dump({"data": _Evil(str(target)), "labels": [0]}, fh)
    with open(path, "rb") as fh:  # negative control: a plain pickle.load creates the file
        pickle.load(fh)["data"].close()
    assert target.exists()
    target.unlink()
    with pytest.raises(DataError) as err:
        build_dataset("cifar10", str(tmp_path), "val", augment=False)
    assert str(err.value) == f"{path}: not a CIFAR batch: it asks to load io.open, which a data file never needs"
    assert not target.exists()


def test_cifar10_not_a_batch(tmp_path):
    make_cifar(tmp_path)
    path = os.path.join(tmp_path, "cifar-10-batches-py", "test_batch")
    with open(path, "wb") as fh:
        pickle.dump({"data": random_images(2, 3, 32, 32, seed=0).reshape(2, 3072), "labels": [1, 2, 3]}, fh)
    with pytest.raises(DataError) as err:
        build_dataset("cifar10", str(tmp_path), "val", augment=False)
    assert str(err.value) == (f"{path}: not a CIFAR batch: 'data' is uint8 (2, 3072), expected uint8 (3, 3072) "
                              "for its 3 labels")
    with open(path, "r+b") as fh:
        fh.truncate(50)  # a half-written copy
    with pytest.raises(DataError) as err:
        build_dataset("cifar10", str(tmp_path), "val", augment=False)
    assert str(err.value).startswith(f"{path}: not a CIFAR batch: ") and "\n" not in str(err.value)


def test_cifar10_exact_and_flip(tmp_path):
    data = make_cifar(tmp_path)
    for split, n in (("train", 10), ("val", 3)):
        ds, info = build_dataset("cifar10", str(tmp_path), split, augment=False)
        images, labels = data[split]
        assert info == DatasetInfo(10, 3, 32, CIFAR_STATS[0], CIFAR_STATS[1])
        assert len(ds) == n and ds.targets.tolist() == list(labels)
        assert [ds[i][1] for i in range(n)] == list(labels)
        x, _ = ds[n - 1]
        for ch, r, c in ((0, 0, 0), (1, 4, 30), (2, 31, 9)):  # channel, row, column
            want = norm(images[n - 1, ch, r, c], CIFAR_STATS[0][ch], CIFAR_STATS[1][ch])
            assert x[ch, r, c].item() == pytest.approx(want, abs=1e-5)

    ds, _ = build_dataset("cifar10", str(tmp_path), "train", augment=True)
    raw = ds.images[3]
    plain = [ds.normalize(c) for c in shifted_crops(raw, 4)]
    flipped = [ds.normalize(c) for c in shifted_crops(raw.flip(-1), 4)]
    outs = check_determinism(ds, index=3, seeds=range(40))
    assert all(contains(plain, o) or contains(flipped, o) for o in outs)
    n_flipped = sum(contains(flipped, o) and not contains(plain, o) for o in outs)
    assert 5 <= n_flipped <= 35, f"{n_flipped}/40 flipped: CIFAR-10 should flip about half the time"


def test_cifar10_results_do_not_depend_on_workers(tmp_path):
    make_cifar(tmp_path)
    ds, _ = build_dataset("cifar10", str(tmp_path), "train", augment=True)
    keys = [(i, 1000 + i) for i in range(len(ds))]

    def run(workers):
        loader = DataLoader(keys, batch_size=3, num_workers=workers, collate_fn=lambda b: [ds[k] for k in b],
                            multiprocessing_context="fork" if workers else None)  # fork: the lambda stays local
        return torch.stack([x for batch in loader for x, _ in batch])

    assert torch.equal(run(0), run(2))


# ----------------------------------------------------------------------------------------- SVHN


def test_svhn_exact_and_no_flip(tmp_path):
    data = make_svhn(tmp_path)
    for split in ("train", "val"):
        ds, info = build_dataset("svhn", str(tmp_path), split, augment=False)
        images, labels = data[split]
        assert info == DatasetInfo(10, 3, 32, SVHN_STATS[0], SVHN_STATS[1])
        assert len(ds) == len(labels) and ds.targets.tolist() == labels  # 10 became 0
        x, y = ds[1]
        assert y == labels[1]
        for ch, r, c in ((0, 0, 31), (1, 10, 2), (2, 31, 31)):
            want = norm(images[1, ch, r, c], SVHN_STATS[0][ch], SVHN_STATS[1][ch])
            assert x[ch, r, c].item() == pytest.approx(want, abs=1e-5)
    assert build_dataset("svhn", str(tmp_path), "train", augment=False)[0].targets.tolist() == [0, 1, 5, 0, 9]

    ds, _ = build_dataset("svhn", str(tmp_path), "train", augment=True)
    crops = [ds.normalize(c) for c in shifted_crops(ds.images[0], 4)]
    assert all(contains(crops, o) for o in check_determinism(ds, index=0, seeds=range(30)))


def test_svhn_label_out_of_range(tmp_path):
    make_svhn(tmp_path, train_labels=(10, 1, 11, 3))  # 10 is digit 0; 11 is no digit
    with pytest.raises(DataError) as err:
        build_dataset("svhn", str(tmp_path), "train", augment=False)
    assert str(err.value) == f"{tmp_path}/train_32x32.mat: label 11 at index 2 is outside 0..9"
    x = scipy.io.loadmat(tmp_path / "train_32x32.mat")["X"]
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": np.array([[1], [2]], dtype=np.uint8)})
    with pytest.raises(DataError) as err:
        build_dataset("svhn", str(tmp_path), "train", augment=False)
    assert str(err.value) == f"{tmp_path}/train_32x32.mat: 2 labels in y for the 4 images in X"


# --------------------------------------------------------------------------------------- digits


def test_digits_split(tmp_path):
    from sklearn.datasets import load_digits

    train, info = build_dataset("digits", str(tmp_path / "unused"), "train", augment=False)
    val, vinfo = build_dataset("digits", str(tmp_path / "unused"), "val", augment=False, seed=123)
    assert info == vinfo == DatasetInfo(10, 1, 32, (0.3059,), (0.3240,))
    assert (len(train), len(val)) == (1437, 360)
    assert set(train.targets.tolist()) == set(val.targets.tolist()) == set(range(10))
    assert train[0][0].shape == (1, 32, 32) and train.images.dtype == torch.uint8
    # train + val is exactly the whole set (a partition, as multisets of (image, label)).
    digits = load_digits()
    all_images = tf.resize_uint8((torch.from_numpy(digits.images) * (255 / 16)).round().to(torch.uint8)[:, None], 32)
    whole = sorted((img.numpy().tobytes(), int(y)) for img, y in zip(all_images, digits.target))
    parts = sorted((img.numpy().tobytes(), int(y)) for ds in (train, val) for img, y in zip(ds.images, ds.targets))
    assert parts == whole
    # The split does not depend on the run seed.
    again, _ = build_dataset("digits", "", "val", augment=False, seed=0)
    assert torch.equal(again.images, val.images)
    # Augmentation: 4 px crops at 32 px, no flip.
    aug, _ = build_dataset("digits", "", "train", augment=True)
    crops = [aug.normalize(c) for c in shifted_crops(aug.images[5], 4)]
    assert all(contains(crops, o) for o in check_determinism(aug, index=5))


# ------------------------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_and_learnable():
    kw = dict(synthetic_size=300, synthetic_classes=4, synthetic_channels=2, seed=3)
    a, info = build_dataset("synthetic", "", "train", augment=False, image_size=16, **kw)
    b, _ = build_dataset("synthetic", "", "train", augment=False, image_size=16, **kw)
    val, _ = build_dataset("synthetic", "", "val", augment=False, image_size=16, **kw)
    other, _ = build_dataset("synthetic", "", "train", augment=False, image_size=16, **{**kw, "seed": 4})
    assert info == DatasetInfo(4, 2, 16, (0.0, 0.0), (1.0, 1.0))
    assert len(a) == 300 and a[0][0].shape == (2, 16, 16) and a[0][0].dtype == torch.float32
    xa = torch.stack([a[i][0] for i in range(len(a))])
    assert torch.equal(xa, torch.stack([b[i][0] for i in range(len(b))]))
    assert torch.equal(a.targets, b.targets) and set(a.targets.tolist()) == {0, 1, 2, 3}
    assert [a[i][1] for i in range(len(a))] == a.targets.tolist()
    assert not torch.equal(a[0][0], val[0][0]) and not torch.equal(a[0][0], other[0][0])
    # Weakly learnable: nearest class mean fitted on train beats chance (25%) clearly on val.
    means = torch.stack([xa[a.targets == k].mean(0) for k in range(4)]).flatten(1)
    xv = torch.stack([val[i][0] for i in range(len(val))]).flatten(1)
    acc = (torch.cdist(xv, means).argmin(1) == val.targets).float().mean().item()
    assert acc > 0.6, acc
    aug, _ = build_dataset("synthetic", "", "train", augment=True, image_size=16, **kw)
    check_determinism(aug, index=2)
    assert torch.equal(aug[2][0], a[2][0])


# ------------------------------------------------------------------------------------- ImageNet


def test_imagenet_folders(tmp_path):
    make_imagenet(tmp_path)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    for split, n in (("train", 9), ("val", 6)):
        ds, info = build_dataset("imagenet", str(tmp_path), split, augment=False, image_size=16)
        assert info == DatasetInfo(3, 3, 16, mean, std)
        assert len(ds) == n
        assert ds.targets.tolist() == sorted([0, 1, 2] * (n // 3))
        for i in range(n):
            x, y = ds[i]
            assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == ds.targets[i]
            color = list(IMAGENET_COLORS.values())[y]
            for ch in range(3):  # a solid JPEG decodes within a couple of levels of its color
                want = norm(color[ch], mean[ch], std[ch])
                assert (x[ch] - want).abs().max().item() < 3 / 255 / std[ch]
    _, info = build_dataset("imagenet", str(tmp_path), "val", augment=False)
    assert info.image_size == 224


def test_imagenet_augmentation_is_seeded(tmp_path):
    # A textured image (solid ones look the same under any crop or flip).
    pixels = random_images(48, 64, 3, seed=0)
    for split in ("train", "val"):
        os.makedirs(tmp_path / split / "n00000001")
        Image.fromarray(pixels).save(tmp_path / split / "n00000001" / "a.JPEG", quality=95)
    ds, _ = build_dataset("imagenet", str(tmp_path), "train", augment=True, image_size=16)
    plain, _ = build_dataset("imagenet", str(tmp_path), "train", augment=False, image_size=16)
    assert ds[(0, 5)][0].shape == (3, 16, 16)
    check_determinism(ds, index=0)  # RandomResizedCrop + flip draw only from the sample seed
    assert torch.equal(ds[0][0], plain[0][0]), "an int key must give the deterministic val transform"
    assert torch.equal(plain[(0, 3)][0], plain[0][0])


def test_imagenet_class_mismatch(tmp_path):
    make_imagenet(tmp_path)
    os.makedirs(tmp_path / "val" / "n09999999")
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "n09999999" / "x.JPEG")
    with pytest.raises(ValueError) as err:
        build_dataset("imagenet", str(tmp_path), "train", augment=False)
    assert os.path.join(str(tmp_path), "train") in str(err.value)
    assert os.path.join(str(tmp_path), "val") in str(err.value) and "n09999999" in str(err.value)


# -------------------------------------------------------------------------------- errors / misuse


@pytest.mark.parametrize("name,cli,path", [
    ("mnist", "MNIST", os.path.join("MNIST", "raw", "train-images-idx3-ubyte")),
    ("fashion", "Fashion", os.path.join("FashionMNIST", "raw", "t10k-labels-idx1-ubyte")),
    ("cifar10", "CIFAR10", os.path.join("cifar-10-batches-py", "data_batch_1")),
    ("svhn", "SVHN", "test_32x32.mat"),
])
def test_missing_dataset_says_where_and_how(tmp_path, name, cli, path):
    root = str(tmp_path / "data")
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(name, root, "val", augment=False)
    msg = str(err.value)
    assert os.path.join(root, path) in msg and name in msg
    assert f"python -m imnet.download --dataset {cli} --root {root}" in msg


def test_missing_imagenet_explains_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("imagenet", str(tmp_path), "train", augment=False)
    msg = str(err.value)
    assert os.path.join(str(tmp_path), "train") in msg
    assert "train/<wnid>/*.JPEG" in msg and "image-net.org" in msg


def test_root_is_a_file(tmp_path):
    (tmp_path / "train.h5").write_bytes(b"")
    for name in ("cifar10", "h5"):
        with pytest.raises(DataError) as err:
            build_dataset(name, str(tmp_path / "train.h5"), "train", augment=False)
        assert str(err.value) == (f"data.root {tmp_path}/train.h5 is a file, not a folder: set it to the folder "
                                  f"that holds the {name} files")


def test_permission_denied_names_the_path(tmp_path, monkeypatch):
    # Simulated: the tests may run as root, which reads anything.
    make_cifar(tmp_path / "c")
    make_imagenet(tmp_path / "i")
    deny(monkeypatch, tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3", tmp_path / "i" / "train")
    for name, root, path in (("cifar10", "c", "c/cifar-10-batches-py/data_batch_3"), ("imagenet", "i", "i/train")):
        with pytest.raises(DataError) as err:
            build_dataset(name, str(tmp_path / root), "train", augment=False)
        assert str(err.value) == f"{tmp_path}/{path}: permission denied"


def test_bad_name_and_split():
    with pytest.raises(ValueError, match="imagenet"):  # lists the valid names
        build_dataset("cifar100", "", "train", augment=False)
    with pytest.raises(ValueError) as err:
        build_dataset("synthetic", "", "test", augment=False)
    assert "'test'" in str(err.value) and "train" in str(err.value) and "val" in str(err.value)
    assert NAMES == ("synthetic", "digits", "mnist", "fashion", "cifar10", "svhn", "imagenet", "tiny_imagenet", "h5")


# ------------------------------------------------------------------------------------- layering

DATA = Path(imnet.data.__file__).parent
LEAVES = {"core", "memory", "samplers", "transforms", "safe_pickle"}  # import no other imnet.data module


def imnet_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every import from imnet in a file, those inside functions included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("imnet"):
            out += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name.startswith("imnet")]
    return out


def test_data_modules_are_layered():
    """No module of imnet.data imports the package face or another module's private name, the leaves
    import only leaves, and the imports between modules (lazy ones too) form no cycle."""
    modules = {p.stem for p in DATA.glob("*.py")} - {"__init__"}
    graph: dict[str, set[str]] = {}
    for name in sorted(modules | {"__init__"}):
        deps = set()
        for module, imported in imnet_imports(DATA / f"{name}.py"):
            assert not imported.startswith("_"), f"imnet/data/{name}.py imports {module}.{imported}"
            if module == "imnet.data":  # `from imnet.data import h5` names a module; anything else is the face
                assert imported in modules, f"imnet/data/{name}.py imports {imported} from the package face"
                deps.add(imported)
            elif module.startswith("imnet.data."):
                deps.add(module.split(".")[2])
        graph[name] = deps
    assert not any("__init__" in deps for deps in graph.values())
    for leaf in LEAVES:
        assert graph[leaf] <= LEAVES, f"leaf {leaf} imports {graph[leaf] - LEAVES}"
    tuple(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a cycle


def test_each_data_module_imports_first():
    """Every imnet.data module imports with no imnet module loaded before it (but the package face, which
    Python runs first): no import works only in some order. One interpreter; imnet's modules are dropped
    before each import."""
    code = """
import importlib, pkgutil, sys
import imnet.data
names = sorted(m.name for m in pkgutil.iter_modules(imnet.data.__path__))
for name in names:
    for loaded in [m for m in sys.modules if m == "imnet" or m.startswith("imnet.")]:
        del sys.modules[loaded]
    importlib.import_module("imnet.data." + name)
print(len(names))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert int(out.stdout) == len(list(DATA.glob("*.py"))) - 1
