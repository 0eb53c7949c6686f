"""Convert any dataset `build_dataset` reads into the fast HDF5 layout (imnet/data/h5.py).

    python -m imnet.data.convert --dataset cifar10 --root data --out data/cifar10-h5
    python -m imnet.data.convert --dataset imagenet --root /datasets/imagenet --out /fast/in64 --image-size 64
    python -m imnet.data.convert --dataset h5 --root old_h5_folder --out old_h5_folder   # old -> fast layout

Writes OUT/train.h5 and OUT/val.h5 (then train with `data.name=h5 data.root=OUT`). The raw uint8
pixels are copied, never the normalized floats: in-memory datasets give `ds.images` (after the
`--image-size` resize, if any); ImageNet JPEGs are decoded with PIL, their shorter side resized to
--image-size (bilinear, PIL's antialiasing when shrinking) and center-cropped to a square; an h5
dataset too big for memory is read image by image. Labels, num_classes, class names and whether a
horizontal flip is a valid augmentation are kept; mean/std are computed from the converted train
split and stored in both files.

Both files are written under temporary names and renamed only when whole, val.h5 first: train.h5,
whose presence selects the fast layout, appears last. `synthetic` is generated on the fly and has
nothing to convert.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

import numpy as np
from PIL import Image

from imnet.data import h5
from imnet.data.core import SPLITS
from imnet.data.datasets import NAMES, ImageFolderDataset, build_dataset
from imnet.data.memory import TensorImageDataset

_BATCH = 1024  # images per HDF5 write for in-memory datasets


def load_square(path: str, size: int) -> np.ndarray:
    """A JPEG (any size, any mode) -> uint8 (size, size, 3): shorter side resized to `size`, center crop."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = size / min(img.size)
            w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
            img = img.resize((w, h), Image.Resampling.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(img.crop((left, top, left + size, top + size)))
    except OSError as e:
        raise OSError(f"image {path} could not be read: {e}") from e


def _batches(ds, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """uint8 (k, H, W, C) images and int64 labels, in dataset order."""
    if isinstance(ds, TensorImageDataset):
        for s in range(0, len(ds), _BATCH):
            yield ds.images[s : s + _BATCH].permute(0, 2, 3, 1).numpy(), ds.targets[s : s + _BATCH].numpy()
    elif isinstance(ds, h5.H5Dataset):
        for i in range(len(ds)):
            yield ds.raw(i).permute(1, 2, 0).numpy()[None], ds.targets[i : i + 1].numpy()
    elif isinstance(ds, ImageFolderDataset):
        for path, label in ds.folder.samples:
            yield load_square(path, size)[None], np.array([label], dtype=np.int64)
    else:
        raise ValueError(f"cannot convert a {type(ds).__name__}: no uint8 images to read")


def _writer(path: str, ds, info, hflip: bool) -> h5.Writer:
    shape = (info.image_size, info.image_size, info.in_channels)
    w = h5.Writer(path, len(ds), shape, num_classes=info.num_classes, classes=getattr(ds, "classes", None),
                  hflip=hflip)
    try:
        for images, labels in _batches(ds, info.image_size):
            w.append(images, labels)
    except BaseException:
        w.discard()
        raise
    return w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m imnet.data.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=[n for n in NAMES if n != "synthetic"])
    p.add_argument("--root", default="data", help="the source dataset's data.root (unused by digits)")
    p.add_argument("--out", required=True, help="folder for train.h5 and val.h5")
    p.add_argument("--image-size", type=int, default=None,
                   help="output side in px (required for imagenet; default: the dataset's native size)")
    args = p.parse_args(argv)
    if args.dataset == "imagenet" and args.image_size is None:
        p.error("--image-size is required for imagenet (its JPEGs have no common size)")
    if args.image_size is not None and args.image_size < 1:
        p.error(f"--image-size must be a positive number of pixels, got {args.image_size}")

    mean_std = None
    with h5.split_writers() as writers:
        for split in SPLITS:  # train first: its mean/std go into both files
            ds, info = build_dataset(args.dataset, args.root, split, augment=False, image_size=args.image_size)
            w = _writer(os.path.join(args.out, f"{split}.h5"), ds, info, hflip=getattr(ds, "flip", True))
            writers.append(w)
            mean_std = mean_std or w.stats()
            w.close(*mean_std)
            del ds  # a split can be GBs: let it go before the next one is built
    for w in writers:
        h_, w_, c = w.shape
        print(f"wrote {w.path}: {w.n} images {h_}x{w_}x{c} uint8 (N, H, W, C), labels int64, "
              f"num_classes {info.num_classes}, mean {tuple(round(v, 4) for v in mean_std[0])}, "
              f"std {tuple(round(v, 4) for v in mean_std[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
