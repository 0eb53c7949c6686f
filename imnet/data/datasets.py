"""Datasets: one builder per name, all yielding normalized float32 (C, H, W) images and int labels.

    ds, info = build_dataset("cifar10", "data", "train", augment=True)
    image, label = ds[(index, sample_seed)]   # augmented, bit-identical for the same pair
    image, label = ds[index]                  # never random

Determinism contract: random augmentation is drawn only from a generator seeded with the
per-sample seed the sampler hands out, so an image depends on (index, sample_seed) alone, not on
the process, the worker count or the caller's global RNG (which is left untouched). That is what
lets the trainer resume mid-epoch exactly.

Small datasets (digits, mnist, fashion, cifar10, svhn, tiny_imagenet, small h5 files) live in memory
as one uint8 (N, C, H, W) tensor (imnet.data.memory) and are augmented as tensors; ImageNet is read from JPEG folders
through PIL. MNIST, Fashion and SVHN files are read with torchvision's dataset classes and
download=False (training never downloads; use `python -m imnet.download` beforehand); CIFAR-10
batches with imnet's own reader, whose unpickler refuses anything but a numpy array (safe_pickle).
Labels are checked against the class count when a split loads; a bad file or folder raises
`DataError`, one line naming the path and the reason. The `h5` dataset (imnet/data/h5.py) reads HDF5 files,
including the fast layout `python -m imnet.data.convert` writes from any of the others.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from imnet.config import NATIVE_IMAGE_SIZE
from imnet.data import safe_pickle
from imnet.data import transforms as tf
from imnet.data.core import SPLITS, DataError, DatasetInfo, check_labels, derive_seed, parse_key
from imnet.data.memory import TensorImageDataset

NAMES = ("synthetic", "digits", "mnist", "fashion", "cifar10", "svhn", "imagenet", "tiny_imagenet", "h5")

# Per-channel statistics of each train split on the 0-1 scale (the usual published values;
# CIFAR-10 std is the per-pixel one, not the often-copied 0.2023/0.1994/0.2010).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    # Computed once from the 1437-image train split after the 8 -> 32 px bilinear upsampling below.
    "digits": ((0.3059,), (0.3240,)),
    # Tiny ImageNet is a 64 px subset of ImageNet: the ImageNet constants are close enough.
    "tiny_imagenet": (tf.IMAGENET_MEAN, tf.IMAGENET_STD),
}

# Horizontal flip (data.hflip=auto) only where the classes are mirror-symmetric: digits and clothes-with-text
# are not (a flipped 2 or 7 is not a digit), CIFAR-10 objects are.
_FLIP = {"digits": False, "mnist": False, "fashion": False, "svhn": False, "cifar10": True, "tiny_imagenet": True}

# Name the user passes to `python -m imnet.download --dataset ...` for each downloadable dataset.
DOWNLOAD_NAMES = {"mnist": "MNIST", "fashion": "Fashion", "cifar10": "CIFAR10", "svhn": "SVHN"}

_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
_IDX_FILES = [f"{p}-{k}-idx{d}-ubyte" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]


def expected_files(name: str, root: str | os.PathLike, split: str = "train") -> list[str]:
    """The files torchvision reads for `name` under `root` (what `imnet.download` creates)."""
    root = os.fspath(root)
    if name in ("mnist", "fashion"):  # torchvision needs all four idx files for either split
        folder = os.path.join(root, "MNIST" if name == "mnist" else "FashionMNIST", "raw")
        return [os.path.join(folder, f) for f in _IDX_FILES]
    if name == "cifar10":  # torchvision checks every batch for either split
        return [os.path.join(root, "cifar-10-batches-py", f) for f in _CIFAR_FILES]
    if name == "svhn":  # stored directly under root, one .mat per split
        return [os.path.join(root, "train_32x32.mat" if split == "train" else "test_32x32.mat")]
    raise ValueError(f"no file list for dataset {name!r}")


# ------------------------------------------------------------------------------------- datasets


class SyntheticDataset(Dataset):
    """Gaussian noise plus a class-dependent pattern: learnable, yet free of any file.

    Image i of a split is drawn from a generator seeded by (seed, split, i), so it is the same in
    every process without being stored. Each class has a smooth random pattern (4x4 px upsampled)
    shared by train and val, so what a model learns on train transfers to val. Pixel values are
    already ~zero-mean/unit-scale (mean 0, std 1 reported): signal amplitude 1, noise std 1.
    """

    def __init__(self, size: int, num_classes: int, channels: int, image_size: int, split: str,
                 seed: int, *, augment: bool, flip: bool = False, pad: int | None = None):
        if size < 1 or num_classes < 1 or channels < 1 or image_size < 1:
            raise ValueError(f"synthetic size, classes, channels and image_size must be >= 1, got "
                             f"{size}, {num_classes}, {channels}, {image_size}")
        self.image_size, self.augment = image_size, augment
        self._base = derive_seed(seed, SPLITS.index(split))
        labels_gen = tf.generator(derive_seed(self._base, 1 << 40))  # one draw for the whole split's labels
        self.targets = torch.randint(0, num_classes, (size,), generator=labels_gen)
        pattern_gen = tf.generator(derive_seed(seed, 1 << 41))  # split-independent: shared by train and val
        self.patterns = torch.randn(num_classes, channels, 4, 4, generator=pattern_gen)
        self.pad = tf.crop_pad(image_size) if pad is None else pad
        self.flip = flip  # off by default: a mirror would blur the class pattern

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, int]:
        index, seed = parse_key(key, len(self))
        label = int(self.targets[index])
        c = self.patterns.shape[1]
        noise = torch.randn(c, self.image_size, self.image_size, generator=tf.generator(derive_seed(self._base, index)))
        pattern = torch.nn.functional.interpolate(self.patterns[label : label + 1], size=noise.shape[-2:],
                                                  mode="bilinear", align_corners=False)[0]
        img = pattern + noise
        if self.augment and seed is not None:
            img = tf.random_crop_flip(img, tf.generator(seed), self.pad, self.flip)
        return img, label

    def to_uint8(self) -> TensorImageDataset:
        """The split's images in memory as uint8 (for data.loader=gpu): x quantized to round(16 x + 128),
        clipped to 0-255, with mean 128/255 and std 16/255, so normalized they are x to within 1/32
        (clipped to [-8, 7.94]: pattern and noise have a standard deviation of about 1.4); same labels,
        crop padding and flip."""
        imgs = torch.stack([self[i][0] for i in range(len(self))])
        q = (imgs * 16 + 128).round_().clamp_(0, 255).to(torch.uint8)
        c = q.shape[1]
        return TensorImageDataset(q, self.targets, (128 / 255,) * c, (16 / 255,) * c, augment=self.augment,
                                  flip=self.flip, pad=self.pad)


class ImageFolderDataset(Dataset):
    """`root/<wnid>/*.JPEG` through torchvision's ImageFolder; PIL transforms under a seeded RNG."""

    def __init__(self, folder: tvd.ImageFolder, size: int, *, augment: bool, flip: bool = True):
        self.folder, self.augment = folder, augment
        self.classes = folder.classes
        self.targets = torch.as_tensor(folder.targets, dtype=torch.int64)
        self.train_transform = tf.imagenet_transform(size, train=True, flip=flip)
        self.eval_transform = tf.imagenet_transform(size, train=False)  # also for unseeded keys

    def __len__(self) -> int:
        return len(self.folder.samples)

    def path(self, index: int) -> str:
        """The image file of sample `index` (an int or an `(index, sample_seed)` key)."""
        return self.folder.samples[parse_key(index, len(self))[0]][0]

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, int]:
        index, seed = parse_key(key, len(self))
        path, label = self.folder.samples[index]
        img = self.folder.loader(path)
        if self.augment and seed is not None:
            with tf.seeded_global_rng(seed):  # torchvision's random transforms use the global RNG
                return self.train_transform(img), int(label)
        return self.eval_transform(img), int(label)


# ---------------------------------------------------------------------------- torchvision readers


def _read_cifar10(root: str, split: str) -> tuple[torch.Tensor, list[int]]:
    """uint8 (N, 3, 32, 32) images and labels of a split, through the restricted unpickler.

    Not torchvision's CIFAR10: it calls pickle.load on the batches, which runs whatever a crafted
    file asks for. Every file must exist, as torchvision requires (md5 sums cannot match test files).
    """
    missing = [p for p in expected_files("cifar10", root) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}")
    folder = os.path.join(root, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        batch = safe_pickle.load(path)
        if isinstance(batch, dict):  # a Python 3 pickle may hold bytes keys
            batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
        if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
            raise DataError(f"{path}: not a CIFAR batch: expected a dict with 'data' and 'labels'")
        data, y = batch["data"], list(batch["labels"])
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (len(y), 3072):
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{path}: not a CIFAR batch: 'data' is {got}, expected uint8 ({len(y)}, 3072) "
                            f"for its {len(y)} labels")
        check_labels(path, y, 10)
        images.append(data.reshape(-1, 3, 32, 32))  # row: 1024 red, 1024 green, 1024 blue, each row-major
        labels += [int(v) for v in y]
    return torch.from_numpy(np.concatenate(images)), labels


class _SVHN(tvd.SVHN):
    """SVHN that only requires the split's .mat file to exist (no md5 check)."""

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))


def _read(name: str, root: str, split: str, read: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    """Run a torchvision reader; missing files -> FileNotFoundError with paths and a download hint."""
    missing = [p for p in expected_files(name, root, split) if not os.path.isfile(p)]
    hint = f"python -m imnet.download --dataset {DOWNLOAD_NAMES[name]} --root {root}"
    try:
        return read()
    except (DataError, PermissionError):  # already names the file and the reason
        raise
    except Exception as e:
        if missing:  # torchvision's RuntimeError("Dataset not found...") or a failed open
            raise FileNotFoundError(
                f"dataset {name!r} ({split}) not found: missing {', '.join(missing)}. "
                f"To download it (needs internet), run: {hint}") from None
        raise DataError(f"dataset {name!r} ({split}) under {root} could not be read, the files may be corrupt or "
                        f"partially downloaded: {' '.join(str(e).split())}. Delete them and re-download with: {hint}"
                        ) from e


def _in_memory(name: str, images: torch.Tensor, targets: Any, req: _Request,
               num_classes: int) -> tuple[Dataset, DatasetInfo]:
    size = req.image_size or NATIVE_IMAGE_SIZE[name]
    images = tf.resize_uint8(images, size)  # no-op at the native size
    mean, std = _STATS[name]
    ds = TensorImageDataset(images, torch.as_tensor(targets), mean, std, augment=req.augment,
                            flip=req.flip(_FLIP[name]), pad=req.crop_pad)
    return ds, DatasetInfo(num_classes, images.shape[1], size, mean, std)


# --------------------------------------------------------------------------------------- builders


@dataclass(frozen=True)
class _Request:
    root: str
    split: str
    augment: bool
    image_size: int | None
    synthetic_size: int
    synthetic_classes: int
    synthetic_channels: int
    seed: int
    hflip: str = "auto"             # data.hflip
    crop_pad: int | None = None     # data.crop_pad

    def flip(self, default: bool) -> bool:
        """Whether training flips: the dataset's `default` under data.hflip=auto."""
        return default if self.hflip == "auto" else self.hflip == "on"


def _build_synthetic(req: _Request) -> tuple[Dataset, DatasetInfo]:
    size, c = req.image_size or NATIVE_IMAGE_SIZE["synthetic"], req.synthetic_channels
    ds = SyntheticDataset(req.synthetic_size, req.synthetic_classes, c, size, req.split, req.seed,
                          augment=req.augment, flip=req.flip(False), pad=req.crop_pad)
    return ds, DatasetInfo(req.synthetic_classes, c, size, (0.0,) * c, (1.0,) * c)


_DIGITS_TRAIN = 1437  # of 1797; the remaining 360 are val
_DIGITS_SALT = 0x5EED_D161  # fixes the split forever; independent of the run seed


def _build_digits(req: _Request) -> tuple[Dataset, DatasetInfo]:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    digits = load_digits()
    # A fixed pseudo-random permutation from a hash (not an RNG whose stream could change between
    # library versions), each part kept in the original order.
    order = sorted(range(len(digits.target)), key=lambda i: derive_seed(_DIGITS_SALT, i))
    part = order[:_DIGITS_TRAIN] if req.split == "train" else order[_DIGITS_TRAIN:]
    idx = torch.tensor(sorted(part))
    # 0..16 ink levels -> 0..255 uint8, one channel, 8x8 px; _in_memory upsamples to 32 px (native).
    images = (torch.from_numpy(digits.images).float() * (255 / 16)).round().to(torch.uint8)[idx, None]
    return _in_memory("digits", images, torch.from_numpy(digits.target)[idx], req, 10)


def _build_mnist_like(name: str, cls: type) -> Callable[[_Request], tuple[Dataset, DatasetInfo]]:
    def build(req: _Request) -> tuple[Dataset, DatasetInfo]:
        ds = _read(name, req.root, req.split,
                   lambda: cls(req.root, train=req.split == "train", download=False))
        prefix = "train" if req.split == "train" else "t10k"
        labels_path = os.path.join(ds.raw_folder, f"{prefix}-labels-idx1-ubyte")
        if len(ds.data) != len(ds.targets):  # torchvision reads the two files independently
            raise DataError(f"{labels_path}: {len(ds.targets)} labels for the {len(ds.data)} images of "
                            f"{prefix}-images-idx3-ubyte")
        check_labels(labels_path, ds.targets.numpy(), 10)
        return _in_memory(name, ds.data[:, None].contiguous(), ds.targets, req, 10)

    return build


def _build_cifar10(req: _Request) -> tuple[Dataset, DatasetInfo]:
    images, labels = _read("cifar10", req.root, req.split, lambda: _read_cifar10(req.root, req.split))
    return _in_memory("cifar10", images, labels, req, 10)


def _build_svhn(req: _Request) -> tuple[Dataset, DatasetInfo]:
    split = "train" if req.split == "train" else "test"
    ds = _read("svhn", req.root, req.split, lambda: _SVHN(req.root, split=split))
    images = torch.from_numpy(ds.data).contiguous()  # torchvision already made it (N, C, H, W)
    path = os.path.join(req.root, ds.filename)
    if len(ds.data) != len(ds.labels):
        raise DataError(f"{path}: {len(ds.labels)} labels in y for the {len(ds.data)} images in X")
    check_labels(path, ds.labels, 10)  # after 10 -> 0: 1..10 are the digits
    return _in_memory("svhn", images, torch.from_numpy(ds.labels), req, 10)  # label 10 -> 0 done


IMAGENET_HELP = (
    "Expected layout: {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG, one folder per class "
    "with the same class folders in both. The ILSVRC2012 val images come flat: sort them into class "
    "folders with `python -m imnet.data.sort_val --val-dir {root}/val --labels LOC_val_solution.csv`, and "
    "list damaged files with `python -m imnet.data.check {root}`. ImageNet cannot be downloaded "
    "automatically: request access and download ILSVRC2012 from https://image-net.org.")


def _build_imagenet(req: _Request) -> tuple[Dataset, DatasetInfo]:
    size = req.image_size or NATIVE_IMAGE_SIZE["imagenet"]
    folder = os.path.join(req.root, req.split)
    help_ = IMAGENET_HELP.format(root=req.root)
    try:
        data = tvd.ImageFolder(folder)
    except FileNotFoundError as e:  # missing folder, no class folders, or no images
        raise FileNotFoundError(f"dataset 'imagenet' ({req.split}) not found at {folder}: {e}. {help_}") from None
    other = os.path.join(req.root, "val" if req.split == "train" else "train")
    if os.path.isdir(other):  # label i must mean the same class in train and val
        other_classes, _ = tvd.folder.find_classes(other)
        if other_classes != data.classes:
            only_here = sorted(set(data.classes) - set(other_classes))[:5]
            only_there = sorted(set(other_classes) - set(data.classes))[:5]
            raise DataError(f"imagenet class folders differ between {folder} ({len(data.classes)} classes) and "
                             f"{other} ({len(other_classes)} classes): only in the first {only_here}, "
                             f"only in the second {only_there}. {help_}")
    ds = ImageFolderDataset(data, size, augment=req.augment, flip=req.flip(True))
    return ds, DatasetInfo(len(data.classes), 3, size, tf.IMAGENET_MEAN, tf.IMAGENET_STD)


TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_SIZE = NATIVE_IMAGE_SIZE["tiny_imagenet"]  # px: every Tiny ImageNet image is 64 x 64


def tiny_imagenet_files(root: str, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(wnids, [(path, label)]) of the official layout; label = line number of the wnid in wnids.txt."""
    wnids_path, folder = os.path.join(root, "wnids.txt"), os.path.join(root, split)
    ann = os.path.join(folder, "val_annotations.txt")
    needed = [wnids_path, folder] + ([ann] if split == "val" else [])
    missing = [p for p in needed if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"dataset 'tiny_imagenet' ({split}) not found: missing {', '.join(missing)}. Expected the official "
            f"layout under {root}: wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
            f"val/val_annotations.txt. Download {TINY_IMAGENET_URL} and unzip it; root is its "
            f"tiny-imagenet-200 folder (there is no automatic download).")
    with open(wnids_path, encoding="utf-8") as fh:
        wnids = [line.strip() for line in fh if line.strip()]
    label = {w: i for i, w in enumerate(wnids)}
    files: list[tuple[str, int]] = []
    if split == "train":
        for w in wnids:
            d = os.path.join(folder, w, "images")
            if not os.path.isdir(d):
                raise FileNotFoundError(f"dataset 'tiny_imagenet' (train): class folder {d} for wnid {w} is missing "
                                        f"(download {TINY_IMAGENET_URL})")
            names = sorted(n for n in os.listdir(d) if n.lower().endswith((".jpeg", ".jpg")))
            files += [(os.path.join(d, n), label[w]) for n in names]
        return wnids, files
    with open(ann, encoding="utf-8") as fh:  # filename \t wnid \t x0 \t y0 \t x1 \t y1, kept in file order
        for line in fh:
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                raise DataError(f"{ann}: expected tab-separated 'filename wnid x0 y0 x1 y1', got {line!r}")
            name, wnid = parts[:2]
            path = os.path.join(folder, "images", name)
            if wnid not in label:
                raise DataError(f"tiny_imagenet val image {path} has wnid {wnid!r} ({ann}), which is not in "
                                 f"{wnids_path}")
            files.append((path, label[wnid]))
    return wnids, files


def _build_tiny_imagenet(req: _Request) -> tuple[Dataset, DatasetInfo]:
    """Tiny ImageNet 200, decoded once into one uint8 (N, 3, 64, 64) tensor and then augmented like CIFAR.

    Memory: 64 * 64 * 3 bytes an image, 1.2 GB for the 100k train images. Every build decodes every
    JPEG with PIL; `python -m imnet.data.convert --dataset tiny_imagenet ...` once, then `h5`, skips
    that. Grayscale JPEGs are converted to RGB. Normalized with the ImageNet mean/std.
    """
    from PIL import Image

    wnids, files = tiny_imagenet_files(req.root, req.split)
    images = torch.empty((len(files), 3, _TINY_SIZE, _TINY_SIZE), dtype=torch.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as img:
                pixels = np.array(img.convert("RGB"))  # a writable copy (12 KB) for torch
        except PermissionError:  # build_dataset names it as such
            raise
        except OSError as e:  # missing, truncated or not an image (PIL's UnidentifiedImageError is an OSError)
            raise DataError(f"tiny_imagenet image {path} could not be read: {' '.join(str(e).split())}") from e
        if pixels.shape != (_TINY_SIZE, _TINY_SIZE, 3):
            raise DataError(f"tiny_imagenet image {path} is {pixels.shape[1]}x{pixels.shape[0]} px, expected "
                             f"{_TINY_SIZE}x{_TINY_SIZE}")
        images[i] = torch.from_numpy(pixels).permute(2, 0, 1)
    ds, info = _in_memory("tiny_imagenet", images, [y for _, y in files], req, len(wnids))
    ds.classes = wnids
    return ds, info


def _build_h5(req: _Request) -> tuple[Dataset, DatasetInfo]:
    from imnet.data import h5  # h5py only when an h5 dataset is built

    return h5.build(req.root, req.split, augment=req.augment, image_size=req.image_size, hflip=req.hflip,
                    crop_pad=req.crop_pad)


_BUILDERS: dict[str, Callable[[_Request], tuple[Dataset, DatasetInfo]]] = {
    "synthetic": _build_synthetic,
    "digits": _build_digits,
    "mnist": _build_mnist_like("mnist", tvd.MNIST),
    "fashion": _build_mnist_like("fashion", tvd.FashionMNIST),
    "cifar10": _build_cifar10,
    "svhn": _build_svhn,
    "imagenet": _build_imagenet,
    "tiny_imagenet": _build_tiny_imagenet,
    "h5": _build_h5,
}
assert tuple(_BUILDERS) == NAMES


def build_dataset(name: str, root: str, split: str, *, augment: bool, image_size: int | None = None,
                  synthetic_size: int = 1024, synthetic_classes: int = 10, synthetic_channels: int = 3,
                  seed: int = 0, hflip: str = "auto", crop_pad: int | None = None) -> tuple[Dataset, DatasetInfo]:
    """Build one split of a dataset; see the module docstring for the key and determinism contract.

    name: one of NAMES. root: data folder (unused by synthetic and digits). split: "train" or "val".
    augment: training augmentation, applied only to `(index, sample_seed)` keys. image_size: output
    side in px (resize once at load for in-memory sets, crop size for imagenet); None = native.
    synthetic_*: size (images), classes and channels of the synthetic set. seed: synthetic data
    seed (digits' split is fixed and ignores it). hflip, crop_pad: data.hflip and data.crop_pad.
    """
    if hflip not in ("auto", "on", "off"):
        raise ValueError(f"hflip must be auto, on or off, got {hflip!r}")
    if name not in _BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    req = _Request(os.fspath(root), split, augment, image_size, synthetic_size, synthetic_classes,
                   synthetic_channels, seed, hflip, crop_pad)
    if name not in ("synthetic", "digits") and os.path.isfile(req.root):
        raise DataError(f"data.root {req.root} is a file, not a folder: set it to the folder that holds the "
                        f"{name} files")
    try:
        return _BUILDERS[name](req)
    except PermissionError as e:  # from any open/listdir below: name the path, not a traceback
        raise DataError(f"{e.filename or req.root}: permission denied") from None
