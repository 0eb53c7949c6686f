"""Read a W&B run file (`run-<id>.wandb`, online and offline runs alike): a leveldb-style log of
`wandb_internal_pb2.Record` messages, which wandb 0.31 writes but has no Python reader for.

imnet reads it for one thing at run time: after a resume, which steps W&B already holds (so the
replayed steps are not logged twice); the tests read runs back with it.

Layout: a 7-byte header (b":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each
chunk a 7-byte header (CRC-32 of type + data, length, type) and its data; a record is one FULL
chunk or FIRST, MIDDLE..., LAST. A block's tail shorter than a chunk header is zero padding.
A file cut short by a kill ends in a partial chunk: reading stops there, as W&B's own reader does.
"""

from __future__ import annotations

import struct
import zlib
from typing import Iterator

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str) -> Iterator:
    """Every whole record in `path`, as `wandb_internal_pb2.Record`, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    if len(data) < HEADER.size or HEADER.unpack_from(data)[:2] != (b":W&B", 0xBEE1):
        raise ValueError(f"{path}: not a W&B run file (no :W&B header)")
    pos, parts = HEADER.size, []
    while pos + CHUNK.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # block padding
            pos += left
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        body = data[pos + CHUNK.size: pos + CHUNK.size + length]
        if kind == 0 or len(body) < length or zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            return  # the end of what was written (a zero-filled tail, or a write cut by a kill)
        pos += CHUNK.size + length
        if kind == FULL:
            parts = [body]
        elif kind == FIRST:
            parts = [body]
            continue
        else:
            parts.append(body)
            if kind == MIDDLE:
                continue
        rec = pb.Record()
        rec.ParseFromString(b"".join(parts))
        yield rec


def history(path: str) -> list[dict]:
    """The history rows in `path`: {key: value} (a nested key joined by ".")."""
    import json

    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item})
    return rows


def last_step(path: str) -> int:
    """The largest `_step` of the history rows in `path` (-1 when there are none)."""
    return max((int(r["_step"]) for r in history(path) if "_step" in r), default=-1)
