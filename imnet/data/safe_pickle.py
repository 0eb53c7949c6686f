"""Read a CIFAR-10 python batch without running whatever a crafted pickle asks for.

    batch = safe_pickle.load(path)   # dict; raises DataError for anything but a batch's contents

A pickle may call any importable function while it loads (`os.system` included), so a downloaded
or copied data file must not go through `pickle.load`. A CIFAR batch holds only a dict of str/bytes,
ints, lists and one uint8 numpy array, so the only globals it may name are numpy's array
reconstruction and, for Python 3 pickles at protocol 2, `_codecs.encode` (how those spell bytes).
"""

from __future__ import annotations

import codecs
import os
import pickle
from typing import Any

import numpy as np

from imnet.data.core import DataError

_ARRAY = np.zeros(0, np.uint8)
# Taken from numpy itself so numpy 1 (numpy.core) and numpy 2 (numpy._core) pickles both resolve
# without importing the deprecated numpy.core shim.
_RECONSTRUCT = _ARRAY.__reduce__()[0]
_FROMBUFFER = _ARRAY.__reduce_ex__(5)[0]  # protocol 5 pickles of an array
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # a pure text -> bytes transform
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh: Any, path: str):
        super().__init__(fh, encoding="latin1")  # Python 2 str -> str, as torchvision reads CIFAR
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"{self.path}: not a CIFAR batch: it asks to load {module}.{name}, which a data "
                            f"file never needs") from None


def load(path: str | os.PathLike) -> Any:
    """The object pickled in `path`, refusing every global but a numpy array's."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        try:
            return _Unpickler(fh, path).load()
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path}: not a CIFAR batch: {type(e).__name__}: {' '.join(str(e).split())}") from None
