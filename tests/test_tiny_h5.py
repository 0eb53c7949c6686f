"""tiny_imagenet and h5 datasets and the HDF5 converter, against tiny files in the real formats."""

from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pytest
import torch
from conftest import check_determinism, contains, shifted_crops
from data_helpers import IMAGENET_MEAN, IMAGENET_STD, norm, random_images, write_jpeg_tree, write_tiny_imagenet
from PIL import Image
from torch.utils.data import DataLoader

from imnet import atomic, config
from imnet.data import convert, h5
from imnet.data.core import DataError, DatasetInfo
from imnet.data.datasets import NAMES, build_dataset
from imnet.data.memory import TensorImageDataset


def test_names_registered():
    assert "tiny_imagenet" in NAMES and "h5" in NAMES


# ------------------------------------------------------------------------------- Tiny ImageNet

# wnids.txt order (the class order) on purpose not sorted.
TINY = {"n03000003": (200, 30, 40), "n01000001": (20, 180, 60), "n02000002": (40, 50, 220)}
GRAY = 90  # the one grayscale JPEG: class 1, image 2
VAL = [("val_0.JPEG", "n02000002"), ("val_1.JPEG", "n03000003"), ("val_2.JPEG", "n02000002")]


def tiny_image(color, k: int, mode: str = "RGB") -> Image.Image:
    """A solid 64x64 image with a white 8x8 square at (8k, 8k) so crops and flips are visible."""
    img = Image.new(mode, (64, 64), color)
    img.paste(255 if mode == "L" else (255, 255, 255), (8 * k, 8 * k, 8 * k + 8, 8 * k + 8))
    return img


def make_tiny(root) -> str:
    train = {wnid: [tiny_image(GRAY, k, "L") if (c, k) == (1, 2) else tiny_image(color, k) for k in range(4)]
             for c, (wnid, color) in enumerate(TINY.items())}
    val = [(name, wnid, tiny_image(TINY[wnid], 1)) for name, wnid in VAL]
    return write_tiny_imagenet(os.path.join(root, "tiny-imagenet-200"), list(TINY), train, val)


def test_tiny_imagenet_official_layout(tmp_path):
    root = make_tiny(tmp_path)
    colors = list(TINY.values())
    for split, labels in (("train", [0] * 4 + [1] * 4 + [2] * 4), ("val", [2, 0, 2])):
        ds, info = build_dataset("tiny_imagenet", root, split, augment=False)
        assert info == DatasetInfo(3, 3, 64, IMAGENET_MEAN, IMAGENET_STD)
        assert len(ds) == len(labels) and ds.targets.tolist() == labels and ds.targets.dtype == torch.int64
        assert ds.images.shape == (len(labels), 3, 64, 64) and ds.classes == list(TINY)
        for i, y in enumerate(labels):
            x, label = ds[i]
            assert x.dtype == torch.float32 and x.shape == (3, 64, 64) and label == y
            want = (GRAY,) * 3 if (split, i) == ("train", 6) else colors[y]
            for ch in range(3):  # far from the white square; JPEG keeps a solid area within a few levels
                mean, std = IMAGENET_MEAN[ch], IMAGENET_STD[ch]
                assert abs(x[ch, 60, 60].item() - norm(want[ch], mean, std)) < 4 / 255 / std
    gray = build_dataset("tiny_imagenet", root, "train", augment=False)[0].images[6]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # grayscale -> RGB


def test_tiny_imagenet_augmentation(tmp_path):
    root = make_tiny(tmp_path)
    ds, _ = build_dataset("tiny_imagenet", root, "train", augment=True)
    plain, _ = build_dataset("tiny_imagenet", root, "train", augment=False)
    raw = ds.images[5]
    crops = [ds.normalize(c) for c in shifted_crops(raw, 8)]  # 8 px at 64 px
    flipped = [ds.normalize(c) for c in shifted_crops(raw.flip(-1), 8)]
    outs = check_determinism(ds, 5, seeds=range(30))
    assert all(contains(crops, o) or contains(flipped, o) for o in outs)
    assert any(contains(flipped, o) and not contains(crops, o) for o in outs), "natural images should flip"
    assert torch.equal(ds[5][0], plain[5][0]) and torch.equal(plain[(5, 3)][0], plain[5][0])


def test_tiny_imagenet_errors(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("tiny_imagenet", missing, "train", augment=False)
    assert os.path.join(missing, "wnids.txt") in str(err.value)
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in str(err.value)

    root = make_tiny(tmp_path)
    with open(os.path.join(root, "val", "val_annotations.txt"), "a") as fh:
        fh.write("val_9.JPEG\tn09999999\t0\t0\t10\t10\n")
    with pytest.raises(ValueError, match="val_9.JPEG"):
        build_dataset("tiny_imagenet", root, "val", augment=False)

    bad = os.path.join(root, "train", "n01000001", "images", "n01000001_3.JPEG")
    with open(bad, "wb") as fh:
        fh.write(b"not a jpeg")
    with pytest.raises(DataError) as err:
        build_dataset("tiny_imagenet", root, "train", augment=False)
    assert bad in str(err.value)


def test_tiny_imagenet_permission_denied(tmp_path, monkeypatch):
    root = make_tiny(tmp_path)
    denied = os.path.join(root, "train", "n02000002", "images")
    real = os.listdir

    def listdir(path="."):  # simulated: the tests may run as root, which reads anything
        if os.fspath(path) == denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(DataError) as err:
        build_dataset("tiny_imagenet", root, "train", augment=False)
    assert str(err.value) == f"{denied}: permission denied"


# ---------------------------------------------------------------------------- old HDF5 layout


def write_old(folder, ids, images: np.ndarray, labels, one_hot: int = 0, name: str = "data.hdf5") -> None:
    """One group per id with `image` (H, W, C) uint8 and `label` (int scalar, or one-hot of length one_hot)."""
    os.makedirs(folder, exist_ok=True)
    with h5py.File(os.path.join(folder, name), "w") as f:
        for sid, img, y in zip(ids, images, labels):
            g = f.create_group(sid)
            g["image"] = img
            g["label"] = np.eye(one_hot, dtype=np.float32)[y] if one_hot else np.int64(y)
    with open(os.path.join(folder, "id.txt"), "w") as fh:
        fh.write("".join(f"{sid}\n" for sid in ids))


def make_old_folders(root):
    """train/ with one-hot labels (length 4), val/ with integer labels up to 5; C = 3, 8x8 px."""
    data = {"train": (random_images(6, 8, 8, 3, seed=1), [0, 1, 2, 3, 1, 0], 4),
            "val": (random_images(3, 8, 8, 3, seed=2), [5, 2, 0], 0)}
    for split, (images, labels, one_hot) in data.items():
        write_old(os.path.join(root, split), [f"{split}-{i:03d}" for i in range(len(labels))], images, labels, one_hot)
    return data


def make_old_single(root, n=40, name="data.hdf5"):
    """root/data.hdf5 (or data.hy) + id.txt, C = 1, integer labels; image i is filled with i (its identity)."""
    ids = [f"sample_{i}" for i in range(n)]
    images = np.repeat(np.arange(n, dtype=np.uint8), 100).reshape(n, 10, 10, 1)
    images[:, 0, 0, 0] = 255  # not constant: std > 0
    labels = [i % 7 for i in range(n)]
    write_old(root, ids, images, labels, name=name)
    return ids, images, labels


def test_old_h5_split_folders(tmp_path):
    data = make_old_folders(tmp_path)
    train_images = data["train"][0].reshape(-1, 3) / 255
    mean, std = tuple(train_images.mean(0)), tuple(train_images.std(0))
    for split, (images, labels, _) in data.items():
        ds, info = build_dataset("h5", str(tmp_path), split, augment=False)
        assert isinstance(ds, TensorImageDataset)
        assert info.num_classes == 6 and (info.in_channels, info.image_size) == (3, 8)  # max label 5 is in val
        np.testing.assert_allclose(info.mean, mean, rtol=1e-9)
        np.testing.assert_allclose(info.std, std, rtol=1e-9)
        assert ds.targets.tolist() == labels and [ds[i][1] for i in range(len(ds))] == labels
        assert torch.equal(ds.images, torch.from_numpy(images).permute(0, 3, 1, 2))
        x, _ = ds[1]
        for ch, r, c in ((0, 0, 0), (1, 3, 7), (2, 7, 2)):
            assert x[ch, r, c].item() == pytest.approx(norm(images[1, r, c, ch], mean[ch], std[ch]), abs=1e-5)
    outs = check_determinism(build_dataset("h5", str(tmp_path), "train", augment=True)[0], 2)
    assert all(o.shape == (3, 8, 8) for o in outs)


def test_old_h5_single_file_holdout_and_data_hy(tmp_path, monkeypatch):
    ids, images, labels = make_old_single(tmp_path, name="data.hy")  # data.hdf5 absent: data.hy is used
    monkeypatch.setattr(h5, "STATS_IMAGES", 5)  # mean/std from the first 5 train images only
    train, info = build_dataset("h5", str(tmp_path), "train", augment=False)
    val, vinfo = build_dataset("h5", str(tmp_path), "val", augment=False, seed=9)
    assert info == vinfo and (info.num_classes, info.in_channels, info.image_size) == (7, 1, 10)
    assert (len(train), len(val)) == (36, 4)
    which = {s: [int(img[0, 1, 1]) for img in ds.images] for s, ds in (("train", train), ("val", val))}
    assert sorted(which["train"] + which["val"]) == list(range(40)) and not set(which["train"]) & set(which["val"])
    assert which["train"] == sorted(which["train"]) and which["val"] == sorted(which["val"])  # id.txt order
    assert [ids[i] for i in which["val"]] == h5.holdout(ids)[1]
    assert [labels[i] for i in which["val"]] == val.targets.tolist()
    first5 = images[which["train"][:5]].reshape(-1) / 255
    assert info.mean == pytest.approx((first5.mean(),)) and info.std == pytest.approx((first5.std(),))
    # Fixed: the same ids every time, whatever the order of id.txt or the run seed.
    again, _ = build_dataset("h5", str(tmp_path), "val", augment=False, seed=1)
    assert torch.equal(again.images, val.images)
    assert sorted(h5.holdout(ids[::-1])[1]) == sorted(h5.holdout(ids)[1])
    tr, va = h5.holdout([f"x{i}" for i in range(1000)])
    assert len(va) == 100 and len(tr) == 900 and not set(tr) & set(va)


def test_old_h5_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("h5", str(tmp_path), "train", augment=False)
    for name in ("train.h5", "data.hdf5", "data.hy", "id.txt"):
        assert os.path.join(str(tmp_path), name) in str(err.value)
    assert "python -m imnet.data.convert" in str(err.value)

    ids, images, labels = make_old_single(tmp_path / "a", n=5)
    with open(tmp_path / "a" / "id.txt", "a") as fh:
        fh.write("ghost_1\nghost_2\n")
    with pytest.raises(ValueError) as err:
        build_dataset("h5", str(tmp_path / "a"), "train", augment=False)
    msg = str(err.value)
    assert "'ghost_1'" in msg and "ghost_2" not in msg and os.path.join(str(tmp_path / "a"), "data.hdf5") in msg

    write_old(tmp_path / "b", ["p", "q", "r"], [np.zeros((4, 4, 3), np.uint8)] * 2 + [np.zeros((4, 5, 3), np.uint8)],
              [0, 1, 0])
    with pytest.raises(ValueError, match="'r'"):  # both splits open the whole file's ids
        build_dataset("h5", str(tmp_path / "b"), "train", augment=False)

    write_old(tmp_path / "c", ["p", "q"], random_images(2, 4, 6, 1, seed=0), [0, 1])
    with pytest.raises(ValueError, match="H == W"):
        build_dataset("h5", str(tmp_path / "c"), "train", augment=False)


# -------------------------------------------------------------------------------- converter


def roundtrip(name, root, out, capsys, image_size=None):
    argv = ["--dataset", name, "--root", str(root), "--out", str(out)]
    assert convert.main(argv + (["--image-size", str(image_size)] if image_size else [])) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["train.h5", "val.h5"]  # no temporary file left behind
    for split in ("train", "val"):
        assert os.path.join(str(out), f"{split}.h5") in printed
        with h5py.File(os.path.join(out, f"{split}.h5"), "r") as f:
            assert f.attrs["format"] == "imnet-h5-v1" and f["images"].dtype == np.uint8
            assert f["labels"].dtype == np.int64 and f["images"].chunks == (1, *f["images"].shape[1:])
    return printed


def assert_same(name, root, out, image_size=None):
    """`h5` from OUT yields exactly the source's uint8 images, labels, classes and info."""
    infos = []
    for split in ("train", "val"):
        src, sinfo = build_dataset(name, str(root), split, augment=False, image_size=image_size)
        dst, dinfo = build_dataset("h5", str(out), split, augment=False)
        assert torch.equal(dst.images, src.images) and torch.equal(dst.targets, src.targets)
        assert (dinfo.num_classes, dinfo.in_channels, dinfo.image_size) == \
            (sinfo.num_classes, sinfo.in_channels, sinfo.image_size)
        assert dst.flip == src.flip and getattr(dst, "classes", None) == getattr(src, "classes", None)
        if split == "train":  # stored mean/std are the converted train split's
            x = src.images.permute(0, 2, 3, 1).reshape(-1, sinfo.in_channels).double() / 255
            assert dinfo.mean == pytest.approx(tuple(x.mean(0).tolist()), abs=1e-9)
            assert dinfo.std == pytest.approx(tuple(x.std(0, unbiased=False).tolist()), abs=1e-9)
        infos.append(dinfo)
    assert infos[0] == infos[1]


def test_convert_digits(tmp_path, capsys):
    printed = roundtrip("digits", tmp_path / "unused", tmp_path / "out", capsys)
    assert "1437 images 32x32x1" in printed and "360 images" in printed
    assert_same("digits", tmp_path / "unused", tmp_path / "out")
    assert build_dataset("h5", str(tmp_path / "out"), "train", augment=False)[0].flip is False


def test_convert_tiny_imagenet_and_old_h5(tmp_path, capsys):
    root = make_tiny(tmp_path)
    roundtrip("tiny_imagenet", root, tmp_path / "tiny", capsys)
    assert_same("tiny_imagenet", root, tmp_path / "tiny")
    roundtrip("tiny_imagenet", root, tmp_path / "tiny32", capsys, image_size=32)  # resized once, then stored
    assert_same("tiny_imagenet", root, tmp_path / "tiny32", image_size=32)

    make_old_folders(tmp_path / "old")
    roundtrip("h5", tmp_path / "old", tmp_path / "old_fast", capsys)
    assert_same("h5", tmp_path / "old", tmp_path / "old_fast")
    make_old_single(tmp_path / "single")
    out = tmp_path / "single_fast"
    roundtrip("h5", tmp_path / "single", out, capsys)
    assert_same("h5", tmp_path / "single", out)


def test_convert_in_place_prefers_fast_layout(tmp_path, capsys):
    ids, images, labels = make_old_single(tmp_path, n=20)
    before = {s: build_dataset("h5", str(tmp_path), s, augment=False)[0] for s in ("train", "val")}
    assert convert.main(["--dataset", "h5", "--root", str(tmp_path), "--out", str(tmp_path)]) == 0
    for split, ds in before.items():
        after, _ = build_dataset("h5", str(tmp_path), split, augment=False)
        assert torch.equal(after.images, ds.images) and torch.equal(after.targets, ds.targets)
    assert sorted(os.listdir(tmp_path)) == ["data.hdf5", "id.txt", "train.h5", "val.h5"]


def test_convert_imagenet_resizes_and_center_crops(tmp_path, capsys):
    colors = {"n01440764": (200, 30, 40), "n01443537": (20, 180, 60)}
    write_jpeg_tree(tmp_path / "in", list(colors), {"train": 3, "val": 1},
                    lambda split, c, k: Image.new("RGB", (40 + 9 * k, 30), list(colors.values())[c]), name="{k}.JPEG")
    with pytest.raises(SystemExit):
        convert.main(["--dataset", "imagenet", "--root", str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    assert "--image-size is required" in capsys.readouterr().err
    roundtrip("imagenet", tmp_path / "in", tmp_path / "out", capsys, image_size=16)
    ds, info = build_dataset("h5", str(tmp_path / "out"), "train", augment=False)
    assert info.num_classes == 2 and info.in_channels == 3 and info.image_size == 16
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 1] and ds.classes == list(colors) and ds.flip
    for img, y in zip(ds.images, ds.targets):
        want = torch.tensor(colors[list(colors)[y]], dtype=torch.float32).view(3, 1, 1)
        assert (img.float() - want).abs().max() <= 4
    # A wide image (58x30) keeps its center: a bright stripe at the center column survives, the edges go.
    img = np.zeros((30, 90, 3), np.uint8)
    img[:, 44:46] = 255
    img[:, :10] = 255
    Image.fromarray(img).save(tmp_path / "wide.png")
    sq = convert.load_square(str(tmp_path / "wide.png"), 30)
    assert sq.shape == (30, 30, 3) and sq[:, 14:16].min() > 200 and sq[:, :3].max() < 30


def test_convert_is_atomic(tmp_path, monkeypatch, capsys):
    calls = []
    real = h5.Writer.append

    def failing(self, images, labels):
        calls.append(self.path)
        if self.path.endswith("val.h5"):
            raise KeyboardInterrupt  # interrupted while writing the second file
        real(self, images, labels)

    monkeypatch.setattr(h5.Writer, "append", failing)
    with pytest.raises(KeyboardInterrupt):
        convert.main(["--dataset", "digits", "--out", str(tmp_path / "out")])
    assert any(p.endswith("train.h5") for p in calls)
    assert os.listdir(tmp_path / "out") == []  # neither file, nor a temporary one
    with pytest.raises(SystemExit):
        convert.main(["--dataset", "synthetic", "--out", str(tmp_path / "out")])


def test_writer_writes_through_imnet_atomic(tmp_path):
    w = h5.Writer(str(tmp_path / "train.h5"), 1, (2, 2, 1), num_classes=1)
    assert atomic.is_temp(os.path.basename(w.tmp)) and os.path.dirname(os.path.abspath(w.tmp)) == str(tmp_path)
    w.append(np.zeros((1, 2, 2, 1), np.uint8), [0])
    w.close(*w.stats())
    assert os.listdir(tmp_path) == [os.path.basename(w.tmp)]  # whole, but not yet under its name
    w.publish()
    w.discard()
    assert os.listdir(tmp_path) == ["train.h5"]


# ------------------------------------------------------------------------- lazy mode, workers


class WorkerProbe(torch.utils.data.Dataset):
    """Reads item i, then reports (pid that opened the reader's file, this process's pid)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.ds[i]
        return torch.tensor([self.ds.reader._pid, os.getpid()])


@pytest.mark.parametrize("layout", ["fast", "old"])
def test_lazy_mode_matches_memory_and_is_worker_safe(tmp_path, monkeypatch, capsys, layout):
    if layout == "fast":
        root = tmp_path / "fast"
        roundtrip("tiny_imagenet", make_tiny(tmp_path), root, capsys)
    else:
        root = tmp_path / "old"
        make_old_folders(root)
    memory, info = build_dataset("h5", str(root), "train", augment=True)
    memory_small, _ = build_dataset("h5", str(root), "val", augment=False, image_size=6)
    monkeypatch.setattr(h5, "IN_MEMORY_BYTES", 0)  # everything counts as too big: one read per item
    lazy, linfo = build_dataset("h5", str(root), "train", augment=True)
    assert isinstance(lazy, h5.H5Dataset) and isinstance(memory, TensorImageDataset) and info == linfo
    assert torch.equal(lazy.targets, memory.targets) and len(lazy) == len(memory)
    for i in range(len(lazy)):
        for key in (i, (i, 1000 + i)):
            a, b = lazy[key], memory[key]
            assert torch.equal(a[0], b[0]) and a[1] == b[1]
    check_determinism(lazy, 1)
    small, _ = build_dataset("h5", str(root), "val", augment=False, image_size=6)
    assert small[0][0].shape == (3, 6, 6) and torch.equal(torch.stack([small.raw(i) for i in range(len(small))]),
                                                          memory_small.images)  # resized per item = all at once

    # The parent now holds an open handle; forked workers must open their own.
    assert lazy.reader._pid == os.getpid()
    keys = [(i, 77 * i + 5) for i in range(len(lazy))] * 2

    def batches(workers):
        loader = DataLoader(lazy, batch_size=4, sampler=keys, num_workers=workers,
                            multiprocessing_context="fork" if workers else None)
        return [(x, y) for x, y in loader]

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel)
    for (xa, ya), (xb, yb) in zip(serial, parallel):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    probes = torch.cat(list(DataLoader(WorkerProbe(lazy), batch_size=2, num_workers=2,
                                       multiprocessing_context="fork")))
    assert torch.equal(probes[:, 0], probes[:, 1]) and (probes[:, 1] != os.getpid()).all()
    # Picklable (spawned workers): the handle stays behind and is reopened on first use.
    clone = pickle.loads(pickle.dumps(lazy))
    assert clone.reader._h5 is None and clone.reader._node is None and torch.equal(clone[(2, 9)][0], lazy[(2, 9)][0])


# ------------------------------------------------------------------------------ damaged files


def write_fast(root, split, labels, n=None, **attrs) -> str:
    """root/<split>.h5 in the fast layout written directly (the Writer refuses what these tests need)."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f"{split}.h5")
    n = len(labels) if n is None else n
    with h5py.File(path, "w") as f:
        f["images"] = random_images(n, 4, 4, 3, seed=n)
        f["labels"] = np.asarray(labels)
        f.attrs.update({"format": "imnet-h5-v1", "num_classes": 3, "mean": [0.5] * 3, "std": [0.25] * 3, **attrs})
    return path


def raised(root, split="train") -> str:
    with pytest.raises(DataError) as err:
        build_dataset("h5", str(root), split, augment=False)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_h5_float_labels_must_be_whole(tmp_path):
    write_fast(tmp_path, "val", [0, 1])
    train = write_fast(tmp_path, "train", np.array([0.0, 2.0, 1.0]))  # whole floats are read as ints
    assert build_dataset("h5", str(tmp_path), "train", augment=False)[0].targets.tolist() == [0, 2, 1]
    train = write_fast(tmp_path, "train", np.array([0.0, 2.0, 5.7]))
    assert raised(tmp_path) == f"{train}: label 5.7 at index 2 is not a whole number"

    ids = ["p", "q"]
    write_old(tmp_path / "old", ids, random_images(2, 4, 4, 1, seed=0), [0, 1])
    with h5py.File(tmp_path / "old" / "data.hdf5", "a") as f:
        del f["q/label"]
        f["q/label"] = np.float32(5.7)
    assert raised(tmp_path / "old") == f"{tmp_path / 'old' / 'data.hdf5'}: sample 'q': label 5.7 is not a whole number"


@pytest.mark.parametrize("row,reason", [
    ([0, 1, 1, 0], "one-hot label has 2 ones, expected exactly one"),
    ([0, 0, 0, 0], "one-hot label has 0 ones, expected exactly one"),
    ([0, 0.5, 0, 0], "one-hot label holds 0.5, not only 0 and 1"),
])
def test_h5_one_hot_rows_must_be_exact(tmp_path, row, reason):
    write_old(tmp_path, ["a", "b", "c"], random_images(3, 4, 4, 3, seed=0), [0, 2, 1], one_hot=4)
    with h5py.File(tmp_path / "data.hdf5", "a") as f:
        del f["b/label"]
        f["b/label"] = np.array(row, dtype=np.float32)
    assert raised(tmp_path) == f"{tmp_path / 'data.hdf5'}: sample 'b': {reason}"


def test_h5_stated_class_count_is_kept(tmp_path):
    write_fast(tmp_path, "train", [0, 1, 2, 1])
    val = write_fast(tmp_path, "val", [2, 5, 0])  # num_classes = 3
    assert raised(tmp_path) == f"{val}: label 5 at index 1 is outside 0..2"  # val checked when train loads
    write_fast(tmp_path, "val", [2, 1, 0])
    train = write_fast(tmp_path, "train", [0, 1, 2, 1], num_classes=0)
    assert raised(tmp_path) == f"{train}: attribute num_classes is 0, expected a positive integer"

    write_old(tmp_path / "old", ["p", "q", "r"], random_images(3, 4, 4, 1, seed=0), [0, 4, 1])
    with h5py.File(tmp_path / "old" / "data.hdf5", "a") as f:
        f.attrs["num_classes"] = 3
    msg = raised(tmp_path / "old")  # the holdout split puts 'q' at index 0 or 1 of its split
    assert msg.startswith(f"{tmp_path / 'old' / 'data.hdf5'}: label 4 at index ")
    assert msg.endswith(" (sample 'q') is outside 0..2")


@pytest.mark.parametrize("attrs,reason", [
    ({"std": [0.25, 0.0, 0.25]}, "attribute std is [0.25, 0.0, 0.25], every value must be finite and > 0"),
    ({"mean": [0.5, np.nan, 0.5]}, "attribute mean is [0.5, nan, 0.5], every value must be finite"),
    ({"mean": [0.5, 0.5]}, "attribute mean has 2 values, expected 1 or 3 (one per channel)"),
])
def test_h5_mean_std_attributes(tmp_path, attrs, reason):
    write_fast(tmp_path, "val", [0, 1])
    train = write_fast(tmp_path, "train", [0, 1, 2], **attrs)
    assert raised(tmp_path, "val") == f"{train}: {reason}"


def test_h5_single_mean_std_apply_to_every_channel(tmp_path):
    write_fast(tmp_path, "val", [0, 1], mean=[0.5], std=[0.25])
    write_fast(tmp_path, "train", [0, 1, 2], mean=[0.5], std=[0.25])
    _, info = build_dataset("h5", str(tmp_path), "train", augment=False)
    assert info.mean == (0.5,) * 3 and info.std == (0.25,) * 3


def test_h5_truncated_or_garbage_file(tmp_path):
    write_fast(tmp_path, "val", [0, 1])
    train = write_fast(tmp_path, "train", [0, 1, 2] * 20)
    os.truncate(train, os.path.getsize(train) // 2)  # a half-copied file
    msg = raised(tmp_path)
    assert msg.startswith(f"{train}: not a readable HDF5 file (truncated or damaged): ") and "truncated file" in msg
    with open(train, "wb") as fh:
        fh.write(np.random.default_rng(0).bytes(4096))
    assert raised(tmp_path).startswith(f"{train}: not a readable HDF5 file (truncated or damaged): ")


def test_h5_permission_denied(tmp_path, monkeypatch):
    write_fast(tmp_path, "val", [0, 1])
    train = write_fast(tmp_path, "train", [0, 1, 2])
    real = h5py.File

    def file(path, *args, **kw):  # simulated: the tests may run as root, which reads anything
        if os.fspath(path) == train:
            raise PermissionError(13, f"Unable to synchronously open file (unable to open file: name = '{path}')")
        return real(path, *args, **kw)

    monkeypatch.setattr(h5py, "File", file)
    assert raised(tmp_path) == f"{train}: permission denied"


def test_h5_empty_lists(tmp_path):
    write_old(tmp_path, [], [], [])  # an empty id.txt next to an empty data file
    assert raised(tmp_path) == f"{tmp_path / 'id.txt'}: no sample ids (one id per line expected)"
    write_fast(tmp_path / "fast", "val", [0, 1])
    train = write_fast(tmp_path / "fast", "train", np.zeros(0, np.int64))
    assert raised(tmp_path / "fast") == f"{train}: no images (the 'images' dataset is empty)"


def test_hflip_follows_the_file_and_a_file_that_does_not_say_is_not_flipped(tmp_path):
    """data.hflip=auto: the fast layout's `hflip` attribute; the old layout has none, and a flip changes the
    class of digits and text, so it is not flipped until the user says so (data.hflip=on)."""
    make_old_folders(tmp_path / "old")
    assert build_dataset("h5", str(tmp_path / "old"), "train", augment=True)[0].flip is False
    assert build_dataset("h5", str(tmp_path / "old"), "train", augment=True, hflip="on")[0].flip is True
    for attr in (True, False):
        root = tmp_path / f"fast_{attr}"
        for split in ("train", "val"):
            write_fast(root, split, [0, 1, 2, 1], hflip=attr)
        assert build_dataset("h5", str(root), "train", augment=True)[0].flip is attr
        assert build_dataset("h5", str(root), "train", augment=True, hflip="off")[0].flip is False
    write_fast(tmp_path / "silent", "train", [0, 1, 2, 1])  # the fast layout without the attribute
    write_fast(tmp_path / "silent", "val", [0, 1])
    assert build_dataset("h5", str(tmp_path / "silent"), "train", augment=True)[0].flip is False


def test_crop_pad_and_hflip_set_the_small_image_recipe(tmp_path):
    """crop_pad=0 with no flip: the training image is the plain one; with hflip=on, the plain one or its
    mirror, both seen; the default pads 4 px per 32 px. crop_pad does not apply to imagenet's recipe."""
    plain, _ = build_dataset("synthetic", "", "train", augment=False, image_size=16, synthetic_size=8)
    still, _ = build_dataset("synthetic", "", "train", augment=True, image_size=16, synthetic_size=8, crop_pad=0)
    mirrored, _ = build_dataset("synthetic", "", "train", augment=True, image_size=16, synthetic_size=8, crop_pad=0,
                                hflip="on")
    default, _ = build_dataset("synthetic", "", "train", augment=True, image_size=16, synthetic_size=8)
    assert (still.pad, still.flip, mirrored.flip, default.pad, default.flip) == (0, False, True, 2, False)
    for i in range(8):
        assert all(torch.equal(still[(i, s)][0], plain[i][0]) for s in range(5))
        outs = [mirrored[(i, s)][0] for s in range(12)]
        assert all(torch.equal(o, plain[i][0]) or torch.equal(o, plain[i][0].flip(2)) for o in outs)
        assert any(torch.equal(o, plain[i][0].flip(2)) for o in outs) and any(torch.equal(o, plain[i][0]) for o in outs)
    with pytest.raises(config.ConfigError, match="data.crop_pad: imagenet trains with a random-resized crop"):
        config.load(None, ["data.name=imagenet", "data.crop_pad=4"])
    assert config.load(None, ["data.name=cifar10", "data.crop_pad=0", "data.hflip=off"]).data.crop_pad == 0
