"""Shared leaf types of imnet.data: what every dataset, loader and format module uses.

DatasetInfo (what a model needs to know of a dataset), SPLITS, the dataset key `i | (i, sample_seed)`
(parse_key), the hash behind every derived seed (derive_seed), and DataError, the one exception a bad
data file or folder raises. This module imports nothing else of imnet.data.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SPLITS = ("train", "val")

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    in_channels: int
    image_size: int  # H == W (px) of the tensors the dataset yields
    mean: tuple[float, ...]  # per-channel normalization applied, 0-1 pixel scale
    std: tuple[float, ...]


class DataError(ValueError):
    """A data file or folder that cannot be used, as one line naming the path and the reason.

    A ValueError so code that already catches ValueError keeps working; entry points catch it to
    print the line instead of a traceback.
    """


def check_labels(path: str | os.PathLike, labels: Sequence[int] | np.ndarray, num_classes: int,
                 ids: Sequence[str] | None = None) -> None:
    """DataError naming the first label outside [0, num_classes), its index in `path` and, given the
    samples' `ids`, its sample id."""
    y = np.asarray(labels).reshape(-1)
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if len(bad):
        i = int(bad[0])
        sample = f" (sample {ids[i]!r})" if ids is not None else ""
        raise DataError(f"{os.fspath(path)}: label {y[i]} at index {i}{sample} is outside 0..{num_classes - 1}")


def parse_key(key: Any, n: int) -> tuple[int, int | None]:
    """`i` or `(i, sample_seed)` -> (non-negative index, seed or None); IndexError when out of range."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"dataset key must be an index or (index, sample_seed), got {key!r}")
        index, seed = key
        seed = None if seed is None else operator.index(seed)
    else:
        index, seed = key, None
    index = operator.index(index)
    if not -n <= index < n:
        raise IndexError(f"index {index} out of range for a dataset of {n} images")
    return index % n, seed


def derive_seed(*parts: int) -> int:
    """Hash ints into one 64-bit seed (splitmix64 finalizer): stable across versions and processes."""
    # Not SeedSequence: it would change the digits split, synthetic images and DALI seeds, at a higher per-call cost.
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h
