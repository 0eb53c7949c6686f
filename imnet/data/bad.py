"""`data.on_bad_image: error | skip`: what a dataset does with an image file it cannot decode.

    ds = BadImagePolicy(ds, "skip", log=print)
    image, label = ds[(index, sample_seed)]   # the same keys the wrapped dataset takes

A bad image is one whose bytes cannot be decoded: an empty file, a truncated JPEG ("image file is
truncated"), something that is not an image at all. Nothing else counts: an `OSError` that carries
an errno (missing file, I/O error, too many open files) says the disk or the mount is broken, not the
image, so it propagates under both policies instead of silently thinning the dataset.

- `error` (the default policy) raises a `RuntimeError` that names the file and the two ways out.
- `skip` returns the next sample instead (index + 1, wrapping around, with the same sample_seed),
  trying up to `max_tries` neighbours. The replacement fills the SAME position of the batch, so
  every rank still yields exactly the number of samples and steps the sampler planned: no rank runs
  short, no collective hangs, and a resumed run still sees the same batches. The price is that the
  neighbour is seen twice that epoch (and `targets` still lists the bad file's own label).

Detection relies on PIL decoding the whole file inside `__getitem__`: torchvision's default loader
does `Image.open(f).convert("RGB")`, which forces a full decode, and PIL's
`ImageFile.LOAD_TRUNCATED_IMAGES` is False by default (if some other library sets it True, truncated
JPEGs load with a grey bottom and are not detected here; `python -m imnet.data.check` still finds
them). A PNG (or GIF, WebP...) named `.JPEG` decodes fine through PIL, so it is NOT bad here; only
`imnet.data.check` reports it, for decoders that trust the file name.

`skipped` and the log messages are per process: with DataLoader workers each worker counts and logs
the bad files it meets (once per distinct bad index); the copy in the main process stays at 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from imnet.data.core import parse_key

POLICIES = ("error", "skip")


def is_bad_image_error(e: BaseException) -> bool:
    """True when `e` from loading a sample means the image bytes are bad (not the disk or the code)."""
    if isinstance(e, (UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, EOFError)):
        return True  # PIL raises SyntaxError / EOFError from some format plugins on corrupt data
    if isinstance(e, OSError):
        return e.errno is None  # PIL's decoder errors carry no errno; ENOENT, EIO, EMFILE do
    return isinstance(e, ValueError)


def describe(e: BaseException, path: str | None) -> str:
    """A short reason for a bad image, without repeating the path."""
    if path is not None:
        try:
            if os.path.getsize(path) == 0:
                return "empty file (0 bytes)"
        except OSError:
            pass
    if isinstance(e, UnidentifiedImageError):
        return "not an image PIL can identify"
    return f"{type(e).__name__}: {e}"


class BadImagePolicy(Dataset):
    """Wrap `ds` so an undecodable image either raises a clear error or is replaced by its neighbour.

    ds: a dataset taking `index` or `(index, sample_seed)` keys; if it has `path(index)`, messages
    name the file. policy: "error" or "skip". log: called with one line per distinct bad index this
    process meets (skip only). root: the data folder named in the error's `check` hint (default: the
    dataset's `root`, or its ImageFolder's). max_tries: neighbours tried before giving up (skip).
    All other attributes (`targets`, `classes`, ...) are forwarded to `ds`.
    """

    def __init__(self, ds: Dataset, policy: str, log: Callable[[str], None] | None = None, *,
                 root: str | None = None, max_tries: int = 50):
        if policy not in POLICIES:
            raise ValueError(f"data.on_bad_image: unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.ds, self.policy, self.log, self.max_tries = ds, policy, log, max_tries
        if root is None:
            root = getattr(ds, "root", None) or getattr(getattr(ds, "folder", None), "root", None)
        self.root = os.fspath(root) if root is not None else "<data root>"
        self.skipped = 0        # samples replaced in this process
        self.bad: set[int] = set()  # distinct bad indices met in this process (each logged once)

    def __len__(self) -> int:
        return len(self.ds)

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally. Guard "ds" itself so unpickling (which
        # looks up attributes before __dict__ is filled) does not recurse.
        if name.startswith("__") or "ds" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.ds, name)

    def path(self, index: int) -> str:
        if hasattr(self.ds, "path"):
            return self.ds.path(index)
        return f"index {index}"

    def __getitem__(self, key: Any) -> Any:
        index, seed = parse_key(key, len(self.ds))
        with_seed = isinstance(key, (tuple, list))
        first_error: BaseException | None = None
        for step in range(self.max_tries + 1 if self.policy == "skip" else 1):
            i = (index + step) % len(self.ds)
            if i in self.bad:  # known bad in this process: do not decode it again
                continue
            try:
                sample = self.ds[(i, seed) if with_seed else i]
            except Exception as e:
                if not is_bad_image_error(e):
                    raise
                path = self.path(i)
                reason = describe(e, path if hasattr(self.ds, "path") else None)
                if self.policy == "error":
                    raise RuntimeError(f"bad image {path}: {reason}. Set data.on_bad_image=skip to replace bad "
                                       f"images, or run python -m imnet.data.check {self.root}") from e
                first_error = first_error or e
                self.bad.add(i)
                if self.log is not None:
                    self.log(f"skipped bad image {path}: {reason}")
                continue
            if step > 0:
                self.skipped += 1
            return sample
        raise RuntimeError(f"bad image {self.path(index)} and its {self.max_tries} next neighbours are all "
                           f"unreadable; the dataset looks broken: run python -m imnet.data.check {self.root}"
                           ) from first_error
