"""Shared leaf types of imnet.data: the one exception a bad data file or folder raises."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


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
