"""Sort the flat ILSVRC2012 val folder into class folders, the layout training reads.

    python -m imnet.data.sort_val --val-dir ROOT/val --labels LOC_val_solution.csv [--dry-run] [--allow-missing]

The val images come as one flat folder of 50,000 files (`ILSVRC2012_val_00000001.JPEG` ...); this
moves each one into `ROOT/val/<wnid>/`. Accepted label files (the form is detected from the content):

- Kaggle's `LOC_val_solution.csv`: header `ImageId,PredictionString`; the wnid is the first token of
  PredictionString (`ILSVRC2012_val_00008726,n02119789 255 142 454 329 ...`).
- a two-column text file, whitespace separated: `ILSVRC2012_val_00000001.JPEG n01751748` (`#` comments
  and blank lines ignored; the extension may be left out).
- the widely shared `valprep.sh`: its `mv ILSVRC2012_val_00000293.JPEG n01440764/` lines.

Files are matched by name without extension. Safe to re-run: files already in the folder their label
names count as done, so a finished (or interrupted) sort can be run again. Before moving anything it
refuses (exit 1, nothing moved) when an image in the folder has no label, a label names a file that
is in neither place, a file sits in another class folder than its label says, or a destination
already exists; `--allow-missing` downgrades the first two to warnings (unlabeled files stay where
they are, missing ones are skipped). `--dry-run` prints each move it would make and moves nothing.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys

from torchvision.datasets.folder import IMG_EXTENSIONS

_SHOW = 5  # examples listed per kind of error
_SAFE = re.compile(r"^[A-Za-z0-9_.+-]+$")  # a class folder name: wnids are n + 8 digits


class LabelError(ValueError):
    pass


def _key(name: str) -> str:
    """The matching key of a file name: without an image extension, if it has one."""
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in IMG_EXTENSIONS else name


def _examples(items) -> str:
    items = sorted(items)
    more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def read_labels(path: str) -> dict[str, str]:
    """{file key: wnid} from any of the accepted label file forms."""
    with open(path, newline="") as f:
        text = f.read()
    lines = text.splitlines()
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    pairs: list[tuple[int, str, str]] = []  # (line number, name, wnid)
    if first.replace(" ", "").lower().startswith("imageid,predictionstring"):  # Kaggle CSV
        for n, row in enumerate(csv.reader(lines), 1):
            if n == 1 or not row:
                continue
            if len(row) < 2 or not row[1].split():
                raise LabelError(f"{path}:{n}: expected 'ImageId,PredictionString', got {','.join(row)!r}")
            pairs.append((n, row[0].strip(), row[1].split()[0]))
    elif any(ln.lstrip().startswith("mv ") for ln in lines):  # valprep.sh
        for n, ln in enumerate(lines, 1):
            tok = ln.split()
            if len(tok) == 3 and tok[0] == "mv":
                pairs.append((n, tok[1], tok[2].rstrip("/")))
    else:  # "name wnid" per line
        for n, ln in enumerate(lines, 1):
            tok = ln.split("#", 1)[0].split()
            if not tok:
                continue
            if len(tok) != 2:
                raise LabelError(f"{path}:{n}: expected 'FILE WNID' (two columns), got {ln.strip()!r}")
            pairs.append((n, tok[0], tok[1]))
    if not pairs:
        raise LabelError(f"{path} holds no labels; expected LOC_val_solution.csv, 'FILE WNID' lines or valprep.sh")
    labels: dict[str, str] = {}
    for n, name, wnid in pairs:
        if wnid.isdigit():
            raise LabelError(f"{path}:{n}: label {wnid!r} is a number, not a class folder name: the devkit's "
                             f"ILSVRC2012_validation_ground_truth.txt uses ILSVRC2012_IDs; use Kaggle's "
                             f"LOC_val_solution.csv or a 'FILE WNID' list instead")
        if not _SAFE.match(wnid) or wnid in (".", ".."):
            raise LabelError(f"{path}:{n}: {wnid!r} is not a usable class folder name")
        key = _key(os.path.basename(name))
        if labels.setdefault(key, wnid) != wnid:
            raise LabelError(f"{path}:{n}: {name} labeled both {labels[key]} and {wnid}")
    return labels


def _images(folder: str) -> dict[str, str]:
    """{key: file name} of the image files directly in `folder` (hidden files ignored)."""
    out: dict[str, str] = {}
    for e in os.scandir(folder):
        if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMG_EXTENSIONS):
            if out.setdefault(_key(e.name), e.name) != e.name:
                raise LabelError(f"{folder} holds both {out[_key(e.name)]} and {e.name}: cannot tell them apart")
    return out


def plan(val_dir: str, labels: dict[str, str], allow_missing: bool
         ) -> tuple[list[tuple[str, str]], int, list[str]]:
    """(moves [(file name, wnid)], files already in place, warnings); LabelError if it must refuse."""
    flat = _images(val_dir)
    placed: dict[str, str] = {}  # key -> the class folder it is in now
    for d in sorted(e.name for e in os.scandir(val_dir) if e.is_dir()):
        for key in _images(os.path.join(val_dir, d)):
            placed.setdefault(key, d)
    moves, done, errors, warnings = [], 0, [], []
    missing, wrong, clash = [], [], []
    for key, wnid in sorted(labels.items()):
        if key in flat:
            if os.path.lexists(os.path.join(val_dir, wnid, flat[key])):
                clash.append(f"{wnid}/{flat[key]}")
            moves.append((flat[key], wnid))
        elif placed.get(key) == wnid:
            done += 1
        elif key in placed:
            wrong.append(f"{placed[key]}/{key} (label {wnid})")
        else:
            missing.append(key)
    unlabeled = [name for key, name in flat.items() if key not in labels]
    for items, what in ((unlabeled, "files in the folder have no label"),
                        (missing, "labels name a file that is not in the folder")):
        if items:
            msg = f"{len(items)} {what}: {_examples(items)}"
            (warnings if allow_missing else errors).append(msg)
    if wrong:
        errors.append(f"{len(wrong)} files are in another class folder than their label says: {_examples(wrong)}")
    if clash:
        errors.append(f"{len(clash)} destinations already exist: {_examples(clash)}")
    if errors:
        hint = "" if allow_missing or wrong or clash else " (--allow-missing sorts the rest anyway)"
        raise LabelError("; ".join(errors) + f". Nothing was moved{hint}.")
    return moves, done, warnings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m imnet.data.sort_val", description=__doc__.split("\n\n")[0])
    p.add_argument("--val-dir", required=True, help="the flat val folder (ROOT/val)")
    p.add_argument("--labels", required=True, help="LOC_val_solution.csv, a 'FILE WNID' text file or valprep.sh")
    p.add_argument("--dry-run", action="store_true", help="print the moves, move nothing")
    p.add_argument("--allow-missing", action="store_true",
                   help="leave unlabeled files in place and skip labels whose file is missing, instead of refusing")
    args = p.parse_args(argv)
    try:
        if not os.path.isdir(args.val_dir):
            raise LabelError(f"{args.val_dir} is not a folder")
        if not os.path.isfile(args.labels):
            raise LabelError(f"label file {args.labels} not found")
        moves, done, warnings = plan(args.val_dir, read_labels(args.labels), args.allow_missing)
    except LabelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    n_classes = len({wnid for _, wnid in moves})
    if not moves:
        print(f"nothing to do: all {done} labeled files are already in their class folders under {args.val_dir}")
        return 0
    for name, wnid in moves:
        if args.dry_run:
            print(f"would move {name} -> {wnid}/{name}")
            continue
        os.makedirs(os.path.join(args.val_dir, wnid), exist_ok=True)
        os.rename(os.path.join(args.val_dir, name), os.path.join(args.val_dir, wnid, name))
    verb = "dry run: would move" if args.dry_run else "moved"
    tail = "; nothing moved" if args.dry_run else ""
    print(f"{verb} {len(moves)} files into {n_classes} class folders under {args.val_dir} "
          f"({done} already in place){tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
