"""Atomic file replacement: a reader of `path` sees the old file or the whole new one, never a part,
and once a call returns the new file and its name survive a crash or a power cut.

The new content goes to a hidden temp file beside `path` (`.NAME.tmp-PID`: same filesystem, so the
rename is atomic; the PID keeps concurrent writers apart), is fsynced, renamed over `path`, and the
folder is fsynced so the rename itself is durable. A writer killed before the rename leaves only
its temp file, which `is_temp` recognizes (the folder's owner deletes it, e.g. imnet.checkpoint).
"""

from __future__ import annotations

import os

_MARK = ".tmp-"


def temp_path(path: str) -> str:
    """Where `path`'s new content is written before the rename."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}{_MARK}{os.getpid()}")


def is_temp(name: str) -> bool:
    """Whether a file name is one of temp_path's."""
    return name.startswith(".") and _MARK in name


def fsync_path(path: str) -> None:
    """fsync a file or a folder by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str, path: str) -> None:
    """Make the written and closed file `tmp` durable under the name `path`."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def write(path: str, write_fn, before_rename=None) -> None:
    """`write_fn(f)` into temp_path(path) opened "wb", then `before_rename(temp path)` (e.g. a checksum
    of the whole file), then commit. On any error the temp file is removed and `path` is untouched."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
        if before_rename is not None:
            before_rename(tmp)
        commit(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
