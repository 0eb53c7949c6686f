"""HDF5 image datasets: the `h5` dataset (two on-disk layouts) and the writer behind `imnet.data.convert`.

Fast layout "imnet-h5-v1" (what `python -m imnet.data.convert` writes), one file per split:

    root/train.h5, root/val.h5
      images  uint8 (N, H, W, C), chunked one image per chunk (1, H, W, C), uncompressed
      labels  int64 (N,)
      attrs   format = "imnet-h5-v1"; num_classes (int); mean, std (float64 (C,), 0-1 pixel scale, of the
              TRAIN split: val.h5 carries the same values); hflip (bool: whether a horizontal flip is a
              valid augmentation; data.hflip=auto follows it, and a file without it, like every file
              of the old layout, is not flipped); classes (optional, class names in label order)

One uncompressed image per chunk: a random read is one contiguous read with nothing to decode in the
DataLoader workers; lzf would save little on natural-image pixels and cost CPU on every read.

Old layout (read only), what users already have: `data.hdf5` (or `data.hy` when data.hdf5 is absent)
holding one group per sample id, each with an `image` dataset (uint8 (H, W, C), C = 1 or 3; a 2-D
(H, W) image is read as C = 1) and a `label` dataset (an integer scalar, or an exact one-hot vector:
one 1, the rest 0), next to `id.txt` listing the sample ids one per line (blank lines ignored). Splits:
`root/train/` and `root/val/` each holding their own data.hdf5 + id.txt; without a `root/train/`
folder, `root/data.hdf5` + `root/id.txt` is split by a fixed hash of each id string (blake2b, keyed,
independent of the run seed and of the order of id.txt): the round(N / 10) ids with the smallest hash
(at least 1 when N >= 2) are val, the others train, each part in id.txt order. Labels are read for
every id when the dataset is built (one small read per id).

Which layout: the fast one whenever `root/train.h5` exists.
num_classes: the `num_classes` attribute (of train.h5, or of the old layout's train data file), else
max label + 1 over both splits (for one-hot labels at least the vector length); every label of both
splits must lie in [0, num_classes). Labels must be whole numbers (a float 5.0 is read as 5; 5.7 is
an error, never truncated). image_size: H (H == W is required). mean/std: the stored attributes
(finite, std > 0, one value or one per channel), else (old layout) computed from at most the first
STATS_IMAGES train images. Any damaged or inconsistent file raises `DataError` naming it.

Memory: a split whose uint8 pixels take less than IN_MEMORY_BYTES is read once into a
`TensorImageDataset` (the CIFAR path, usable by a GPU-resident loader); a larger one is an
`H5Dataset` that reads one image per __getitem__. Both are imnet.data.memory's Uint8ImageDataset
(one crop/flip/normalize recipe), so both modes give bit-identical items. Workers: an h5py handle
must not be used across a fork, so a file is opened lazily by the process that reads it (the pid is
remembered; a forked DataLoader worker closes its inherited copy and reopens) and is never pickled.
Readers open files with `locking=False`: files are only ever replaced whole by a rename (see
`Writer`), never written in place.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from imnet import atomic
from imnet.data import transforms as tf
from imnet.data.core import DataError, DatasetInfo, check_labels
from imnet.data.memory import TensorImageDataset, Uint8ImageDataset

FORMAT = "imnet-h5-v1"
IN_MEMORY_BYTES = 2 << 30  # 2 GiB of uint8 pixels: a smaller split is loaded into memory once
STATS_IMAGES = 1000  # old layout: mean/std from at most this many first train images
HOLDOUT_KEY = b"imnet-h5-holdout-v1"  # fixes the old single-file layout's val split forever
OLD_DATA_NAMES = ("data.hdf5", "data.hy")

HELP = ("Expected either the fast layout {root}/train.h5 + {root}/val.h5 (write it with "
        "`python -m imnet.data.convert --dataset NAME --root SRC --out {root}`) or the old layout: "
        "{root}/data.hdf5 (or data.hy) + {root}/id.txt, or {root}/train/ and {root}/val/ each holding "
        "data.hdf5 + id.txt.")


def _unreadable(path: str, e: OSError) -> DataError:
    if isinstance(e, PermissionError) or e.errno == errno.EACCES:
        return DataError(f"{path}: permission denied")
    return DataError(f"{path}: not a readable HDF5 file (truncated or damaged): {' '.join(str(e).split())}")


def _open(path: str) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _unreadable(path, e) from None


@contextlib.contextmanager
def _reading(path: str):
    """`_open(path)` for a whole read: an error reading inside a damaged file names the file too."""
    with _open(path) as f:
        try:
            yield f
        except OSError as e:
            raise _unreadable(path, e) from None


def _whole(path: str, where: str, values: np.ndarray) -> np.ndarray:
    """int64 labels from integer or whole float `values`; DataError naming the first that is not whole."""
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind != "f":
        raise DataError(f"{path}: {where}labels must be numbers, got {values.dtype}")
    flat = values.reshape(-1)
    bad = np.flatnonzero(~np.isfinite(flat) | (flat != np.round(flat)))
    if len(bad):  # a truncated 5.7 would train on a wrong class without a word
        at = f" at index {int(bad[0])}" if values.ndim else ""
        raise DataError(f"{path}: {where}label {flat[bad[0]]!s}{at} is not a whole number")  # str: float32 5.7
    return values.astype(np.int64)


def _one_hot(path: str, where: str, vector: np.ndarray) -> int:
    """The class of an exact one-hot vector (one 1, the rest 0); DataError otherwise."""
    others = sorted(set(np.unique(vector).tolist()) - {0, 1})
    if others:
        raise DataError(f"{path}: {where}one-hot label holds {others[0]}, not only 0 and 1")
    ones = int(np.count_nonzero(vector))
    if ones != 1:
        raise DataError(f"{path}: {where}one-hot label has {ones} ones, expected exactly one")
    return int(np.argmax(vector))


class _Reader:
    """One HDF5 file opened on first use by each process; `labels` (int64 numpy) and `shape` (H, W, C)."""

    labels: np.ndarray
    shape: tuple[int, int, int]
    NODE = "/"  # the object image() reads from: looked up once per process, not at every read

    def __init__(self, path: str):
        self.path, self._h5, self._node, self._pid = path, None, None, None

    def node(self) -> Any:
        """This process's handle on NODE: opened on first use, reopened in a forked worker."""
        if self._pid != os.getpid():
            if self._h5 is not None:  # inherited through fork: close this process's copy only
                self._h5.close()
            self._h5, self._pid = _open(self.path), os.getpid()
            self._node = self._h5[self.NODE]
        return self._node

    def __getstate__(self) -> dict:  # an open h5py handle cannot (and must not) travel to a worker
        return {**self.__dict__, "_h5": None, "_node": None, "_pid": None}

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> np.ndarray:  # uint8 (H, W, C)
        raise NotImplementedError

    def load(self, stop: int | None = None) -> np.ndarray:  # uint8 (N, H, W, C), through a temporary handle
        raise NotImplementedError


class _Fast(_Reader):
    """root/<split>.h5 in the imnet-h5-v1 layout."""

    NODE = "images"

    def __init__(self, path: str):
        super().__init__(path)
        with _reading(path) as f:
            if f.attrs.get("format") != FORMAT:
                raise DataError(f"{path}: attribute format is {f.attrs.get('format')!r}, expected {FORMAT!r}")
            images, labels = f.get("images"), f.get("labels")
            if (not isinstance(images, h5py.Dataset) or images.ndim != 4 or images.dtype != np.uint8
                    or not isinstance(labels, h5py.Dataset) or labels.shape != images.shape[:1]):
                raise DataError(f"{path}: expected datasets 'images' uint8 (N, H, W, C) and 'labels' (N,)")
            if len(images) == 0:
                raise DataError(f"{path}: no images (the 'images' dataset is empty)")
            self.shape = tuple(images.shape[1:])
            self.labels = _whole(path, "", labels[()])
            self.attrs = dict(f.attrs)

    def image(self, index: int) -> np.ndarray:
        return self.node()[index]

    def load(self, stop: int | None = None) -> np.ndarray:
        with _reading(self.path) as f:
            return f["images"][:stop]


class _Old(_Reader):
    """The old layout: one group per sample id (`image`, `label`), restricted to `ids`."""

    def __init__(self, path: str, ids: Sequence[str], id_path: str):
        super().__init__(path)
        self.ids = list(ids)
        self.one_hot = 0  # length of the one-hot label vectors (0: integer labels)
        labels, shape, first = [], None, None
        with _reading(path) as f:
            self.attrs = dict(f.attrs)
            for sid in self.ids:
                if sid not in f:
                    raise DataError(f"sample id {sid!r} listed in {id_path} is missing from {path}")
                g = f[sid]
                if not isinstance(g, h5py.Group) or "image" not in g or "label" not in g:
                    raise DataError(f"sample {sid!r} in {path} must be a group with 'image' and 'label' datasets")
                s = g["image"].shape
                s = (*s, 1) if len(s) == 2 else s
                if len(s) != 3 or s[2] not in (1, 3) or g["image"].dtype != np.uint8:
                    raise DataError(f"sample {sid!r} in {path}: image must be uint8 (H, W, C) with C = 1 or 3, "
                                    f"got {g['image'].dtype} {g['image'].shape}")
                if shape is None:
                    shape, first = s, sid
                elif s != shape:
                    raise DataError(f"sample {sid!r} in {path} has image shape {s} but sample {first!r} has "
                                    f"{shape}: all images must share one H x W x C")
                label, where = np.asarray(g["label"][()]), f"sample {sid!r}: "
                if label.size == 1:
                    labels.append(int(_whole(path, where, label.reshape(()))))
                elif label.ndim == 1:
                    labels.append(_one_hot(path, where, label))
                    self.one_hot = max(self.one_hot, label.size)
                else:
                    raise DataError(f"{path}: {where}label must be an integer or a one-hot vector, got shape "
                                    f"{label.shape}")
        self.shape = shape or (0, 0, 0)
        self.labels = np.asarray(labels, dtype=np.int64)

    def take(self, keep: Sequence[int]) -> _Old:
        """The samples at positions `keep` (a split of this file), without reading anything."""
        part = copy.copy(self)
        part.__dict__.update(self.__getstate__())  # no handle
        part.ids, part.labels = [self.ids[i] for i in keep], self.labels[list(keep)]
        return part

    def image(self, index: int) -> np.ndarray:
        return self.node()[f"{self.ids[index]}/image"][()].reshape(self.shape)

    def load(self, stop: int | None = None) -> np.ndarray:
        ids = self.ids[:stop]
        out = np.empty((len(ids), *self.shape), dtype=np.uint8)
        with _reading(self.path) as f:
            for i, sid in enumerate(ids):
                out[i] = f[sid]["image"][()].reshape(self.shape)
        return out


# ------------------------------------------------------------------------------------ old layout


def read_ids(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            ids = [line.strip() for line in fh if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text file of sample ids ({e.reason} at byte {e.start})") from None
    if not ids:
        raise DataError(f"{path}: no sample ids (one id per line expected)")
    seen: set[str] = set()
    for sid in ids:
        if sid in seen:
            raise DataError(f"sample id {sid!r} is listed twice in {path}")
        seen.add(sid)
    return ids


def holdout(ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, val) ids of the old single-file layout: a fixed, hash-based 10 % val split."""
    def key(sid: str) -> bytes:
        return hashlib.blake2b(sid.encode("utf-8"), digest_size=8, key=HOLDOUT_KEY).digest()

    n_val = 0 if len(ids) < 2 else max(1, round(len(ids) / 10))
    val = set(sorted(ids, key=key)[:n_val])
    return [s for s in ids if s not in val], [s for s in ids if s in val]


def _old_files(root: str, folder: str, split: str) -> tuple[str, str]:
    """(data file, id.txt) in `folder`; FileNotFoundError naming every path looked at."""
    candidates = [os.path.join(folder, n) for n in OLD_DATA_NAMES]
    data = next((p for p in candidates if os.path.isfile(p)), None)
    ids = os.path.join(folder, "id.txt")
    if data is None or not os.path.isfile(ids):
        looked = [os.path.join(root, "train.h5"), *candidates, ids]
        raise FileNotFoundError(f"dataset 'h5' ({split}) not found: looked for {', '.join(looked)}. "
                                + HELP.format(root=root))
    return data, ids


def _old_readers(root: str, split: str) -> tuple[_Reader, _Reader, list[_Reader]]:
    """(this split, the train split, every split found) for the old layout."""
    if os.path.isdir(os.path.join(root, "train")):
        this_path, this_ids = _old_files(root, os.path.join(root, split), split)
        this = _Old(this_path, read_ids(this_ids), this_ids)
        other_split = "val" if split == "train" else "train"
        other = None
        if split == "val" or os.path.isdir(os.path.join(root, other_split)):
            path, id_path = _old_files(root, os.path.join(root, other_split), other_split)
            other = _Old(path, read_ids(id_path), id_path)
        train = this if split == "train" else other
        return this, train, [r for r in (this, other) if r is not None]
    path, id_path = _old_files(root, root, split)
    whole = _Old(path, read_ids(id_path), id_path)  # checks every id and one shape over the whole file
    val_ids = set(holdout(whole.ids)[1])
    train, val = (whole.take([i for i, sid in enumerate(whole.ids) if (sid in val_ids) == v]) for v in (False, True))
    return (train if split == "train" else val), train, [train, val]


# ------------------------------------------------------------------------------------- datasets


class H5Dataset(Uint8ImageDataset):
    """One image per __getitem__ from an HDF5 reader, with the in-memory datasets' recipe."""

    def __init__(self, reader: _Reader, size: int, mean: Sequence[float], std: Sequence[float], *,
                 augment: bool, flip: bool, pad: int | None = None):
        super().__init__(reader.labels, mean, std, size=size, augment=augment, flip=flip, pad=pad)
        self.reader, self.size = reader, size

    def raw(self, index: int) -> torch.Tensor:
        """Image `index` as uint8 (C, size, size), resized if needed, never augmented."""
        img = torch.from_numpy(np.ascontiguousarray(self.reader.image(index))).permute(2, 0, 1).contiguous()
        return tf.resize_uint8(img[None], self.size)[0]


class _Sums:
    """Running per-channel sum and sum of squares (float64, 0-1 scale) -> mean, std."""

    def __init__(self, channels: int):
        self.n, self.s, self.ss = 0, np.zeros(channels), np.zeros(channels)

    def add(self, images: np.ndarray) -> None:  # uint8 (N, H, W, C)
        x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255
        self.n += len(x)
        self.s += x.sum(0)
        self.ss += np.square(x).sum(0)

    def result(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        mean = self.s / max(self.n, 1)
        std = np.sqrt(np.maximum(self.ss / max(self.n, 1) - mean**2, 0))
        std[std == 0] = 1.0  # a constant channel: leave its scale alone rather than divide by zero
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the 0-1 scale of uint8 (N, H, W, C) images."""
    sums = _Sums(images.shape[-1])
    sums.add(images)
    return sums.result()


def _channel_stat(path: str, attrs: dict, key: str, channels: int) -> tuple[float, ...]:
    """The `mean` or `std` attribute as one float per channel: finite, std > 0, 1 or C values."""
    try:
        v = np.asarray(attrs[key], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: attribute {key} is {attrs[key]!r}, expected numbers") from None
    if v.size not in (1, channels):
        raise DataError(f"{path}: attribute {key} has {v.size} values, expected 1 or {channels} (one per channel)")
    if not np.isfinite(v).all() or (key == "std" and (v <= 0).any()):
        need = "finite and > 0" if key == "std" else "finite"
        raise DataError(f"{path}: attribute {key} is {v.tolist()}, every value must be {need}")
    return tuple(float(x) for x in np.broadcast_to(v, (channels,)))


def build(root: str, split: str, *, augment: bool, image_size: int | None, hflip: str = "auto",
          crop_pad: int | None = None) -> tuple[Dataset, DatasetInfo]:
    """The `h5` dataset: see the module docstring for the layouts and rules."""
    if os.path.isfile(os.path.join(root, "train.h5")):
        paths = {s: os.path.join(root, f"{s}.h5") for s in ("train", "val")}
        if not os.path.isfile(paths[split]):
            raise FileNotFoundError(f"dataset 'h5' ({split}) not found: {paths[split]} is missing next to "
                                    f"{paths['train']}. " + HELP.format(root=root))
        train = _Fast(paths["train"])
        val = _Fast(paths["val"]) if os.path.isfile(paths["val"]) else None
        this, found = (train if split == "train" else val), [r for r in (train, val) if r is not None]
        attrs = train.attrs
    else:
        this, train, found = _old_readers(root, split)
        attrs = {k: v for k, v in train.attrs.items() if k == "num_classes"}  # the only attribute it may state

    h, w, c = this.shape
    if h != w:
        raise DataError(f"dataset 'h5' ({split}) under {root}: images are {h}x{w} px, only square images "
                         f"(H == W) are supported")
    if this.shape != train.shape:
        raise DataError(f"dataset 'h5' under {root}: {split} images are {this.shape} (H, W, C) but train "
                         f"images are {train.shape}")
    one_hot = max((getattr(r, "one_hot", 0) for r in found), default=0)
    max_label = max((int(r.labels.max()) for r in found if len(r)), default=-1)
    if "num_classes" in attrs:
        num_classes = attrs["num_classes"]
        if np.ndim(num_classes) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise DataError(f"{train.path}: attribute num_classes is {np.asarray(num_classes).tolist()!r}, "
                            "expected a positive integer")
        num_classes = int(num_classes)
    else:
        num_classes = max(max_label + 1, one_hot)
    for r in found:  # both splits: a stated class count is never raised to fit a stray label
        check_labels(r.path, r.labels, num_classes, ids=r.ids if isinstance(r, _Old) else None)
    if "mean" in attrs and "std" in attrs:
        mean, std = (_channel_stat(train.path, attrs, k, c) for k in ("mean", "std"))
    else:
        mean, std = stats(train.load(STATS_IMAGES))
    # data.hflip=auto: the file says whether a mirror keeps the class; a file that does not say (the original
    # GroupNorm project's layout) is not flipped: a flip changes the class of digits and text
    flip = bool(attrs.get("hflip", False)) if hflip == "auto" else hflip == "on"
    size = image_size or h

    if len(this) * h * w * c < IN_MEMORY_BYTES:
        images = torch.from_numpy(this.load()).permute(0, 3, 1, 2).contiguous()
        ds: Dataset = TensorImageDataset(tf.resize_uint8(images, size), torch.from_numpy(this.labels), mean, std,
                                         augment=augment, flip=flip, pad=crop_pad)
    else:
        ds = H5Dataset(this, size, mean, std, augment=augment, flip=flip, pad=crop_pad)
    if "classes" in attrs:
        ds.classes = [str(name) for name in attrs["classes"]]
    return ds, DatasetInfo(num_classes, c, size, mean, std)


# --------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def split_writers():
    """`with split_writers() as writers:` collects the Writers of a set's splits; a block that ends
    cleanly publishes them last first (val.h5 before train.h5, whose presence selects the fast
    layout), and any exit removes what was not published."""
    writers: list[Writer] = []
    try:
        yield writers
        for w in reversed(writers):
            w.publish()
    finally:
        for w in writers:
            w.discard()


class Writer:
    """Write one split in the fast layout to a temporary file next to `path`.

        w = Writer(path, n, (H, W, C), num_classes=10)
        w.append(images_nhwc, labels)  # as many times as needed, n images in all
        w.close(mean, std)             # attributes; the whole file, still under the temporary name
        w.publish()                    # imnet.atomic.commit: fsync, rename to `path`, fsync the folder
        w.discard()                    # (in a finally) removes the temporary file unless published

    An interrupted conversion therefore never leaves a file under the final name.
    """

    def __init__(self, path: str, n: int, shape: Sequence[int], *, num_classes: int,
                 classes: Sequence[str] | None = None, hflip: bool = True):
        h, w, c = shape
        if n < 1:
            raise ValueError(f"{path}: nothing to write (0 images)")
        self.path, self.n, self.shape, self.count = path, n, (h, w, c), 0
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.tmp = atomic.temp_path(path)
        self._f: h5py.File | None = h5py.File(self.tmp, "w")
        self._images = self._f.create_dataset("images", (n, h, w, c), dtype=np.uint8, chunks=(1, h, w, c))
        self._labels = self._f.create_dataset("labels", (n,), dtype=np.int64)
        self._f.attrs["format"] = FORMAT
        self._f.attrs["num_classes"] = int(num_classes)
        self._f.attrs["hflip"] = bool(hflip)
        if classes is not None:
            self._f.attrs["classes"] = np.array([str(x) for x in classes], dtype=h5py.string_dtype())
        self._sums = _Sums(c)
        self._published = False

    def append(self, images: np.ndarray, labels: Sequence[int] | np.ndarray) -> None:
        images, labels = np.asarray(images), np.asarray(labels, dtype=np.int64)
        if images.dtype != np.uint8 or images.shape[1:] != self.shape or len(labels) != len(images):
            raise ValueError(f"{self.path}: expected uint8 images (k, {', '.join(map(str, self.shape))}) and k "
                             f"labels, got {images.dtype} {images.shape} and {labels.shape}")
        end = self.count + len(images)
        if end > self.n:
            raise ValueError(f"{self.path}: more than the announced {self.n} images")
        self._images[self.count : end] = images
        self._labels[self.count : end] = labels
        self._sums.add(images)
        self.count = end

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """mean, std (per channel, 0-1 scale) of the images appended so far."""
        return self._sums.result()

    def close(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if self.count != self.n:
            raise ValueError(f"{self.path}: {self.count} of {self.n} images written")
        self._f.attrs["mean"] = np.asarray(mean, dtype=np.float64)
        self._f.attrs["std"] = np.asarray(std, dtype=np.float64)
        self._f.close()
        self._f = None

    def publish(self) -> None:
        if self._f is not None:
            raise RuntimeError(f"{self.path}: close() before publish()")
        atomic.commit(self.tmp, self.path)
        self._published = True

    def discard(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if not self._published and os.path.exists(self.tmp):
            os.remove(self.tmp)
