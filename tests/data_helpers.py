"""Helpers the data tests share: tiny datasets written in the real on-disk layouts and the pixel
arithmetic that checks them. Test modules import them with `from data_helpers import ...` (tests/ is
on sys.path, as for conftest)."""

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

# Written out rather than taken from imnet: the tests pin the values.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def norm(value: float, mean: float, std: float) -> float:
    """What a uint8 pixel value becomes after ToTensor-style scaling and normalization."""
    return (value / 255 - mean) / std


def random_images(*shape: int, seed: int) -> np.ndarray:
    """uint8 noise of `shape` (any layout: NCHW, NHWC, ...), the same for the same seed."""
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def write_jpeg_tree(root, classes: Sequence[str], per_split: Mapping[str, int],
                    image: Callable[[str, int, int], Image.Image], *, name: str = "{wnid}_{k}.JPEG",
                    quality: int = 95) -> str:
    """The ImageNet layout: root/<split>/<wnid>/<name>, per_split[split] JPEGs per class.

    image(split, c, k) makes class c's k-th image, called in (split, class, k) order; `name` may use
    {split}, {c}, {wnid} and {k}."""
    for split, n in per_split.items():
        for c, wnid in enumerate(classes):
            folder = os.path.join(root, split, wnid)
            os.makedirs(folder, exist_ok=True)
            for k in range(n):
                path = os.path.join(folder, name.format(split=split, c=c, wnid=wnid, k=k))
                image(split, c, k).save(path, quality=quality)
    return str(root)


def write_tiny_imagenet(root, wnids: Sequence[str], train: Mapping[str, Sequence[Image.Image]],
                        val: Sequence[tuple[str, str, Image.Image]], *, quality: int = 95) -> str:
    """The official Tiny ImageNet layout under root: wnids.txt in the given (label) order,
    train/<wnid>/images/<wnid>_<k>.JPEG from train[wnid] (and the zip's <wnid>_boxes.txt, unread),
    val/images/<name> and val/val_annotations.txt from val's (name, wnid, image)."""
    os.makedirs(os.path.join(root, "val", "images"), exist_ok=True)
    with open(os.path.join(root, "wnids.txt"), "w") as fh:
        fh.write("\n".join(wnids) + "\n")
    for wnid in wnids:
        folder = os.path.join(root, "train", wnid, "images")
        os.makedirs(folder)
        open(os.path.join(root, "train", wnid, f"{wnid}_boxes.txt"), "w").close()
        for k, img in enumerate(train[wnid]):
            img.save(os.path.join(folder, f"{wnid}_{k}.JPEG"), quality=quality)
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as fh:
        for name, wnid, img in val:  # filename, wnid, box x0 y0 x1 y1 (the box is not read)
            img.save(os.path.join(root, "val", "images", name), quality=quality)
            fh.write(f"{name}\t{wnid}\t0\t0\t63\t63\n")
    return str(root)
