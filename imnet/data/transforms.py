"""Tensor augmentation and normalization with explicit randomness.

Every random draw here comes from a `torch.Generator` the caller seeds per sample (or, for the
torchvision PIL pipeline, from the global RNG inside `torch.random.fork_rng`), so one
(index, sample_seed) pair gives a bit-identical image in any process and for any number of
DataLoader workers, and the caller's global RNG state is never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torchvision import transforms as T

_MASK64 = (1 << 64) - 1  # torch.Generator seeds are unsigned 64-bit

# ImageNet per-channel statistics on the 0-1 scale (the torchvision reference recipe).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def generator(seed: int) -> torch.Generator:
    """A CPU generator for one sample; any Python int is accepted (folded to 64 bits)."""
    return torch.Generator().manual_seed(int(seed) & _MASK64)


def crop_pad(size: int) -> int:
    """Zero padding (px) for the random crop: 4 px per 32 px of side (12.5%), at least 1 px.

    4 px is the standard CIFAR recipe; scaling keeps the same relative jitter when a small dataset
    is resized (MNIST 28 px -> 4 px, 64 px -> 8 px).
    """
    return max(1, round(4 * size / 32))


def random_crop_flip(img: torch.Tensor, g: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Random crop of a (C, H, W) tensor from its zero-padded version, then an optional 50% h-flip.

    Draw order is fixed (top, left, flip) so the same generator state always gives the same result.
    Zero padding is black for uint8 images and the mean for already-normalized ones.
    """
    _, h, w = img.shape
    top, left = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    do_flip = bool(torch.randint(0, 2, (1,), generator=g))  # drawn even when unused: fixed order
    out = F.pad(img, (pad, pad, pad, pad))[:, top : top + h, left : left + w]
    if flip and do_flip:
        out = out.flip(-1)
    return out.contiguous()


def normalize_uint8(img: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (C, H, W) in 0..255 -> float32 (x/255 - mean) / std; mean/std are (C, 1, 1)."""
    return img.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Bilinear resize of uint8 (N, C, H, W) images to (size, size), rounded back to uint8.

    Done once at load time, in chunks of `chunk` images to bound the float32 working memory.
    antialias only matters when shrinking (it avoids aliasing); it is a no-op when enlarging.
    """
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float32)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def imagenet_transform(size: int, train: bool, flip: bool = True) -> Callable:
    """The torchvision reference recipe: PIL image -> normalized float32 (3, size, size).

    train: RandomResizedCrop(size) + RandomHorizontalFlip (unless not `flip`; draw from the global RNG:
    call it under `seeded_global_rng`). val: Resize(size * 256/224) + CenterCrop(size), no randomness.
    """
    if train:
        geometry: Sequence = [T.RandomResizedCrop(size), *([T.RandomHorizontalFlip()] if flip else [])]
    else:
        geometry = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed torch's global CPU RNG for the body only; the caller's RNG state is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) & _MASK64)
        yield
