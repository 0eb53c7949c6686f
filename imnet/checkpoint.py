"""Checkpoints that survive SIGKILL at any instant.

A checkpoint is written to a hidden temp file in the same folder, fsynced, and renamed into place
(`ckpt_00000120.pt`); only then does the `latest` pointer (itself written the same way) move to
it, and only then are checkpoints beyond the newest `keep` deleted. So a half-written file never
has a checkpoint's name, and `latest` always names a whole file. Loading uses weights_only=True:
everything saved is tensors and plain builtins (the config is saved as a dict).
"""

from __future__ import annotations

import os
import random
import re
from typing import Optional

import numpy as np
import torch

POINTER = "latest"
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(folder)


class Checkpointer:
    def __init__(self, folder: str, keep: int = 3, is_main: bool = True, wrap=None):
        """`wrap(file, step)`: the file object a checkpoint is written through (fault injection's hook)."""
        self.folder, self.keep, self.is_main = folder, keep, is_main
        self.wrap = wrap or (lambda f, step: f)
        if is_main:
            os.makedirs(folder, exist_ok=True)
            for name in os.listdir(folder):  # temp files of a run that was killed mid-write
                if name.startswith(".ckpt_") and ".tmp-" in name:
                    os.unlink(os.path.join(folder, name))

    def path_for(self, step: int) -> str:
        return os.path.join(self.folder, f"ckpt_{step:08d}.pt")

    def saved(self) -> list[str]:
        """Complete checkpoint files, oldest first."""
        if not os.path.isdir(self.folder):
            return []
        names = sorted(n for n in os.listdir(self.folder) if _NAME.match(n))
        return [os.path.join(self.folder, n) for n in names]

    def latest(self) -> Optional[str]:
        pointer = os.path.join(self.folder, POINTER)
        if not os.path.isfile(pointer):
            return None
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(self.folder, name)
        return path if _NAME.match(name) and os.path.isfile(path) else None

    def save(self, state: dict, step: int) -> Optional[str]:
        """Rank 0 writes; other ranks return None. Callers make the state identical on every rank."""
        if not self.is_main:
            return None
        path = self.path_for(step)
        atomic_write(path, lambda f: torch.save(state, self.wrap(f, step)))
        atomic_write(os.path.join(self.folder, POINTER), lambda f: f.write(os.path.basename(path).encode()))
        for old in self.saved()[:-self.keep]:
            if old != path:
                os.unlink(old)
        return path

    def find_resume(self, resume: str) -> Optional[str]:
        """The file to resume from for `ckpt.resume`: auto -> `latest` (None on a fresh run)."""
        if resume == "never":
            return None
        if resume != "auto":
            return resume
        latest = self.latest()
        if latest is None and self.saved():
            # killed between renaming the file and moving the pointer: the file is whole
            latest = self.saved()[-1]
        return latest


def load(path: str, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise RuntimeError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e


# ---- RNG state of every generator in use, as weights_only-loadable values ----

def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))

