"""The small-image recipe shared by every dataset of uint8 images: a random crop of the zero-padded
image and a flip drawn from the sample seed, then per-channel normalization.

Uint8ImageDataset holds the recipe and reads each image through `raw(index)`; TensorImageDataset
keeps all images in memory as one uint8 (N, C, H, W) tensor (the CIFAR path, also what a
GPU-resident loader copies to the device); imnet.data.h5 reads them one by one from a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from imnet.data import transforms as tf
from imnet.data.core import parse_key


class Uint8ImageDataset(Dataset):
    """uint8 (C, H, W) images from `raw(index)`; random crop (zero pad) + flip per sample seed, normalized.

    `targets`, `mean`, `std`, `augment`, `pad` and `flip` are public so a GPU-resident loader can
    apply the same recipe on the device. `size`: the images' side (px), for the default padding.
    """

    def __init__(self, targets: Any, mean: Sequence[float], std: Sequence[float], *, size: int, augment: bool,
                 flip: bool, pad: int | None = None):
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self.augment, self.flip = augment, flip
        self.pad = tf.crop_pad(size) if pad is None else pad  # px of zero padding for the random crop

    def __len__(self) -> int:
        return len(self.targets)

    def raw(self, index: int) -> torch.Tensor:
        """Image `index` as uint8 (C, H, W), never augmented."""
        raise NotImplementedError

    def normalize(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 (C, H, W) -> float32 (x/255 - mean) / std, as every item is returned."""
        return tf.normalize_uint8(img, self._mean, self._std)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, int]:
        index, seed = parse_key(key, len(self))
        img = self.raw(index)
        if self.augment and seed is not None:
            img = tf.random_crop_flip(img, tf.generator(seed), self.pad, self.flip)
        return self.normalize(img), int(self.targets[index])


class TensorImageDataset(Uint8ImageDataset):
    """uint8 images (N, C, H, W) in memory (`images`), with Uint8ImageDataset's recipe."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], *, augment: bool, flip: bool, pad: int | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        super().__init__(targets, mean, std, size=images.shape[-1], augment=augment, flip=flip, pad=pad)
        self.images = images.contiguous()

    def raw(self, index: int) -> torch.Tensor:
        return self.images[index]
