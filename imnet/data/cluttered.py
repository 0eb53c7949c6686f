"""Cluttered digits: a harder set made offline from scikit-learn's digits, in the fast HDF5 layout.

    python -m imnet.data.cluttered --out data/cluttered_digits
    python -m imnet.train --config configs/digits_gn.yaml data.name=h5 data.root=data/cluttered_digits

Each 32x32 image holds one digit of imnet's digits split (train images for train.h5, val images
for val.h5), scaled to 18-26 px and moved up to 3 px from the center, over a distractor (a 4x4-pixel
piece of another digit of the same split, scaled alike, anywhere), with its own contrast (ink x
0.3-1), background level (0-100 of 255) and Gaussian pixel noise (sigma 16). Digits alone are too
easy to tell the norms apart (RESULTS.md); here the images of a batch differ in their statistics
as natural photos do, which is what a batch of 2 estimates badly. One image per source digit
(1437 train, 360 val) from a fixed seed: every run of the generator writes the same pixels.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from imnet.data import h5
from imnet.data.core import SPLITS
from imnet.data.datasets import build_dataset

SIZE = 32               # px, the canvas
DIGIT = (18, 26)        # px, side of a placed digit (inclusive range)
JITTER = 3              # px the digit moves from the center, each way
PIECES = 1              # distractor pieces per image
PIECE = 4               # px of the 8x8 source digit a piece is cut from
CONTRAST = (0.3, 1.0)   # per-image gain of the ink
BACKGROUND = (0, 100)   # per-image background level, 0-255 scale
NOISE = 16.0            # sigma of the pixel noise, 0-255 scale


def _resize(img8: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(img8.astype(np.float32))[None, None]
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()


def make(images8: np.ndarray, seed: int) -> np.ndarray:
    """uint8 (N, 8, 8) digits on 0-255 -> uint8 (N, 32, 32) cluttered images."""
    rng = np.random.default_rng(seed)
    n = len(images8)
    out = np.zeros((n, SIZE, SIZE), np.float32)
    for i in range(n):
        canvas = out[i]
        for _ in range(PIECES):
            src = images8[rng.integers(n)]
            r, c = rng.integers(0, 8 - PIECE + 1, size=2)
            side = int(rng.integers(DIGIT[0], DIGIT[1] + 1)) * PIECE // 8
            piece = _resize(src[r:r + PIECE, c:c + PIECE], side)
            y, x = rng.integers(0, SIZE - side + 1, size=2)
            np.maximum(canvas[y:y + side, x:x + side], piece, out=canvas[y:y + side, x:x + side])
        side = int(rng.integers(DIGIT[0], DIGIT[1] + 1))
        y, x = (SIZE - side) // 2 + rng.integers(-JITTER, JITTER + 1, size=2)
        digit = _resize(images8[i], side)
        np.maximum(canvas[y:y + side, x:x + side], digit, out=canvas[y:y + side, x:x + side])
        canvas *= rng.uniform(*CONTRAST)
        canvas += rng.uniform(*BACKGROUND) + rng.normal(0.0, NOISE, size=canvas.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _digits8(split: str) -> tuple[np.ndarray, np.ndarray]:
    """imnet's digits split at its source resolution: uint8 (N, 8, 8) on 0-255 and labels."""
    ds, _ = build_dataset("digits", "", split, augment=False, image_size=8)
    return ds.images[:, 0].numpy(), ds.targets.numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m imnet.data.cluttered", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for train.h5 and val.h5")
    p.add_argument("--seed", type=int, default=0, help="the generator's seed (val uses seed + 1)")
    a = p.parse_args(argv)
    mean_std = None
    with h5.split_writers() as writers:
        for k, split in enumerate(SPLITS):  # train first: its mean/std go into both files
            images8, labels = _digits8(split)
            images = make(images8, a.seed + k)[..., None]
            w = h5.Writer(os.path.join(a.out, f"{split}.h5"), len(images), images.shape[1:], num_classes=10,
                          hflip=False)  # a mirrored digit is not a digit
            writers.append(w)
            w.append(images, labels)
            mean_std = mean_std or w.stats()
            w.close(*mean_std)
    for w in writers:
        print(f"wrote {w.path}: {w.n} images {SIZE}x{SIZE}x1, mean {mean_std[0][0]:.4f}, std {mean_std[1][0]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
