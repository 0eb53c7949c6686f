"""Checkpoints that survive SIGKILL at any instant, and damage.

A checkpoint is written to a hidden temp file in the same folder and fsynced; its SHA-256 goes to
a sidecar (`ckpt_00000120.pt.sha256`, written the same way) before the file is renamed into place
(`ckpt_00000120.pt`); only then does the `latest` pointer (itself written the same way) move to it,
and only then are checkpoints beyond the newest `keep` deleted. So a half-written file never has a
checkpoint's name, and every named file has its checksum beside it.

Resuming (`find_resume("auto")`) takes the newest checkpoint whose bytes match its checksum (files
from before checksums: whose zip members match their CRC-32s). A damaged one is set aside as
`<name>.bad`, with a warning naming it, and the next newest is tried; a `latest` that cannot be
read, or that names an older file than the newest whole one, is a warning too. Loading uses
weights_only=True: everything saved is tensors and plain builtins (the config is saved as a dict).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import sys
import zipfile
from typing import Optional

import numpy as np
import torch

from imnet import atomic

POINTER = "latest"
SUM = ".sha256"     # the sidecar beside each checkpoint: the hex SHA-256 of its bytes
BAD = ".bad"        # a damaged checkpoint set aside: kept for inspection, never resumed from
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names the file and what is intact."""


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(path: str) -> None:
    """Raise CheckpointError unless `path`'s bytes are whole: they match the sidecar's SHA-256, or,
    without a sidecar (older checkpoints), every zip member matches its CRC-32 (torch.load checks none)."""
    try:
        if os.path.isfile(path + SUM):
            with open(path + SUM, "rb") as f:
                want = f.read().decode("ascii", "replace").strip()
            if sha256(path) != want:
                raise CheckpointError(f"{path}: its bytes do not match its checksum ({os.path.basename(path)}{SUM})")
            return
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad is not None:
            raise CheckpointError(f"{path}: member {bad} does not match its CRC-32")
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OSError at the root of `e` (torch.save wraps a failed write in its own RuntimeError)."""
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


class Checkpointer:
    def __init__(self, folder: str, keep: int = 3, is_main: bool = True, wrap=None, warn=None):
        """`wrap(file, step)`: the file object a checkpoint is written through (fault injection's hook).
        `warn(message)`: where find_resume's warnings go (stderr by default)."""
        self.folder, self.keep, self.is_main = folder, keep, is_main
        self.wrap = wrap or (lambda f, step: f)
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if is_main:
            os.makedirs(folder, exist_ok=True)
            names = set(os.listdir(folder))
            for name in names:
                stale = atomic.is_temp(name)  # temp files of a run killed mid-write
                orphan = name.endswith(SUM) and name[:-len(SUM)] not in names  # killed before the rename
                if stale or orphan:
                    os.unlink(os.path.join(folder, name))

    def path_for(self, step: int) -> str:
        return os.path.join(self.folder, f"ckpt_{step:08d}.pt")

    def saved(self) -> list[str]:
        """Checkpoint files, oldest first."""
        if not os.path.isdir(self.folder):
            return []
        names = sorted(n for n in os.listdir(self.folder) if _NAME.match(n))
        return [os.path.join(self.folder, n) for n in names]

    def pointer(self) -> tuple[Optional[str], str]:
        """(the file `latest` names if it is a checkpoint that exists, else None; why not, or '')."""
        path = os.path.join(self.folder, POINTER)
        try:
            with open(path, "rb") as f:
                name = f.read(256).decode("ascii").strip()
        except FileNotFoundError:
            return None, ""
        except (OSError, UnicodeDecodeError) as e:
            return None, f"{path} cannot be read ({type(e).__name__})"
        if not _NAME.match(name):
            return None, f"{path} does not hold a checkpoint name"
        if not os.path.isfile(os.path.join(self.folder, name)):
            return None, f"{path} names {name}, which does not exist"
        return os.path.join(self.folder, name), ""

    def latest(self) -> Optional[str]:
        return self.pointer()[0]

    def save(self, state: dict, step: int) -> Optional[str]:
        """Rank 0 writes; other ranks return None. Callers make the state identical on every rank.
        A failed write (a full disk) is a CheckpointError naming the folder and the intact checkpoint."""
        if not self.is_main:
            return None
        path = self.path_for(step)

        def checksum(tmp: str) -> None:  # the sidecar exists before the checkpoint has its name
            digest = sha256(tmp)
            atomic.write(path + SUM, lambda f: f.write(digest.encode() + b"\n"))

        try:
            atomic.write(path, lambda f: torch.save(state, self.wrap(f, step)), before_rename=checksum)
            atomic.write(os.path.join(self.folder, POINTER), lambda f: f.write(os.path.basename(path).encode()))
        except Exception as e:
            if (err := _os_error(e)) is None:
                raise
            prev = self.latest()
            kept = (f"the previous checkpoint {os.path.basename(prev)} is intact" if prev and prev != path
                    else "no earlier checkpoint exists")
            raise CheckpointError(f"cannot write checkpoint {os.path.basename(path)} in {self.folder}: "
                                  f"{err.strerror or err}; {kept}") from e
        for old in self.saved()[:-self.keep]:
            if old != path:
                os.unlink(old)
                remove_file(old + SUM)
        return path

    def set_aside(self, path: str) -> str:
        """Rename a damaged checkpoint out of the way (kept for inspection): `<name>.bad`."""
        os.replace(path, path + BAD)
        return path + BAD

    def find_resume(self, resume: str, set_aside: bool = True) -> Optional[str]:
        """The file to resume from for `ckpt.resume`: auto -> the newest whole checkpoint (None on a
        fresh run), damaged ones set aside (`set_aside`) with a warning; a path -> that file, if whole.
        Call it on one rank: it may rename files (the trainer broadcasts its answer)."""
        if resume == "never":
            return None
        if resume != "auto":
            if not os.path.isfile(resume):
                raise FileNotFoundError(f"ckpt.resume: no checkpoint file {resume}")
            verify(resume)
            return resume
        named, why = self.pointer()
        if why:
            self.warn(f"warning: {why}; resuming from the newest whole checkpoint")
        for path in reversed(self.saved()):
            try:
                verify(path)
            except CheckpointError as e:
                moved = f"set aside as {os.path.basename(self.set_aside(path))}, " if set_aside else ""
                self.warn(f"warning: checkpoint {e}; {moved}trying the one before")
                continue
            if named is not None and named != path and os.path.isfile(named):  # not the one set aside
                self.warn(f"warning: {POINTER} names {os.path.basename(named)}, but {os.path.basename(path)} is newer "
                          "and whole: resuming from it (to go back, give ckpt.resume=PATH)")
            return path
        return None


def remove_file(path: str) -> None:
    """os.unlink, and nothing if the file is already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def load(path: str, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # any unpickling failure means the same thing to the user
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

