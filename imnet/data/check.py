"""Find the image files a loader would choke on, before a training run meets them.

    python -m imnet.data.check ROOT [--fix-list GOOD.txt] [--workers N]

ROOT is an ImageNet-style folder (`ROOT/train/<class>/*`, `ROOT/val/<class>/*`; whichever of the two
exist), or a folder that directly holds class folders (e.g. `ROOT/train` itself), or any folder of
split folders of class folders (`ROOT/<split>/<class>/*`). Inside a class folder files are found
recursively; only files with an image extension torchvision's ImageFolder reads are checked (the
same files, in the same sorted order, that training uses).

Output, stdout, one line per finding, tab separated, in sorted path order:

    PATH<TAB>empty                              0 bytes
    PATH<TAB>truncated                          PIL's full decode stops early ("image file is truncated")
    PATH<TAB>unreadable: REASON                 not an image, or a decode error other than truncation
    PATH<TAB>mislabeled: PNG named .JPEG        the content's format is not the extension's
    DIR<TAB>empty class: no image files         ImageFolder refuses a class folder without images
    DIR<TAB>unreadable folder: REASON           it cannot be listed ("permission denied"): its files go unchecked
    DIR<TAB>unsorted: N image files directly in the split folder (sort them with python -m imnet.data.sort_val ...)
    PATH<TAB>note: cmyk JPEG ...                not a problem: PIL decodes it, some GPU JPEG decoders do not

Summary on stderr: `checked N files in M classes: K problems` (M counts distinct class names over the
splits; notes are not problems). Exit code 1 if K > 0, 0 if none, 2 on a usage error or a ROOT that
cannot be listed (`error: ROOT: permission denied`).

`--fix-list OUT.txt` writes the files that decode, one `relative/path label` line each: the DALI
`readers.file(file_root=SPLIT_FOLDER, file_list=OUT.txt)` format, paths relative to the split
folder with `/`, label = index of the class folder in sorted order (torchvision's ImageFolder
labels, so DALI and the torch loader agree). With several splits it writes one list per split,
`OUT.train.txt`, `OUT.val.txt` (or substitutes `{split}` if OUT contains it). Empty, truncated and
unreadable files are left out. Mislabeled files are KEPT when their real format is one DALI's
`fn.decoders.image` decodes (it sniffs the content: JPEG, PNG, BMP, TIFF, PNM, WebP), so the DALI
and torch loaders see the same images; any other real format (GIF...) is left out. A path with
whitespace cannot be written in this format and is left out with a note on stderr.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass, field

from PIL import Image, ImageFile, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

# PIL format names each extension may hold ("MPO" is a multi-picture JPEG from cameras: still JPEG).
_EXT_FORMATS = {
    ".jpg": {"JPEG", "MPO"}, ".jpeg": {"JPEG", "MPO"}, ".png": {"PNG"}, ".bmp": {"BMP"},
    ".tif": {"TIFF"}, ".tiff": {"TIFF"}, ".webp": {"WEBP"}, ".ppm": {"PPM"}, ".pgm": {"PPM"},
}
_DALI_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}
_SPLITS = ("train", "val")
_PROGRESS_EVERY = 50_000  # files; a progress line on stderr for big trees (ImageNet: 1.33M files)


def is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


@dataclass
class Split:
    name: str  # "" when ROOT itself holds the class folders
    folder: str
    classes: list[str]
    files: list[tuple[str, int]] = field(default_factory=list)  # (path relative to folder, label)
    loose: int = 0  # image files directly in the split folder (ImageFolder ignores them)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason) that could not be listed


def _reason(e: OSError) -> str:
    return "permission denied" if isinstance(e, PermissionError) else " ".join((e.strerror or str(e)).split())


def _subdirs(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def _has_images(folder: str) -> bool:
    try:
        return any(e.is_file() and is_image(e.name) for e in os.scandir(folder))
    except OSError:  # unreadable: reported when the split is walked
        return False


def _has_subdirs(folder: str) -> bool:
    try:
        return bool(_subdirs(folder))
    except OSError:  # keep it, so the walk reports it instead of dropping it unseen
        return True


def find_splits(root: str) -> list[Split]:
    """The split folders under `root` and their class folders; raises FileNotFoundError if none and
    PermissionError if `root` itself cannot be listed. A folder below it that cannot be listed is
    recorded in its split's `unreadable`, not skipped in silence (os.walk's default)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} is not a folder")
    names = [s for s in _SPLITS if os.path.isdir(os.path.join(root, s))]
    if names:  # ImageNet layout
        pairs = [(s, os.path.join(root, s)) for s in names]
    elif any(_has_images(os.path.join(root, d)) for d in _subdirs(root)):  # root holds class folders
        pairs = [("", root)]
    else:  # any folder of split folders
        pairs = [(d, os.path.join(root, d)) for d in _subdirs(root) if _has_subdirs(os.path.join(root, d))]
    if not pairs:
        raise FileNotFoundError(f"no class folders under {root}: expected {root}/train/<class>/*, "
                                f"{root}/val/<class>/* or {root}/<class>/*")
    splits = []
    for name, folder in pairs:
        split = Split(name, folder, [])
        splits.append(split)
        try:
            split.classes = _subdirs(folder)
            split.loose = sum(1 for e in os.scandir(folder) if e.is_file() and is_image(e.name))
        except OSError as e:
            split.unreadable.append((folder, _reason(e)))
            continue

        def unreadable(e: OSError, split: Split = split) -> None:
            split.unreadable.append((e.filename, _reason(e)))

        for label, cls in enumerate(split.classes):
            # ImageFolder's own walk and order: sorted os.walk, sorted file names, symlinks followed.
            walk = os.walk(os.path.join(folder, cls), onerror=unreadable, followlinks=True)
            for dirpath, _, fnames in sorted(walk):
                rel = os.path.relpath(dirpath, folder)
                split.files += [(os.path.join(rel, f).replace(os.sep, "/"), label) for f in sorted(fnames)
                                if is_image(f)]
    return splits


def _cut_short(path: str) -> bool:
    """A JPEG or PNG signature without the format's end marker: the file was cut (copy, download)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, os.path.getsize(path) - 8))
            tail = f.read()
    except OSError:
        return False
    if head.startswith(b"\xff\xd8\xff"):  # JPEG SOI; EOI is FF D9
        return not tail.endswith(b"\xff\xd9")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):  # PNG ends with the IEND chunk and its CRC
        return not tail.endswith(b"IEND\xaeB`\x82")
    return False


def check_file(path: str) -> tuple[str | None, str | None, bool]:
    """(problem or None, note or None, dali_ok) for one file; a full PIL decode like the loader's."""
    try:
        if os.path.getsize(path) == 0:
            return "empty", None, False
        with open(path, "rb") as f:
            img = Image.open(f)
            fmt, mode = img.format, img.mode
            img.convert("RGB")  # what torchvision's loader does: decodes every byte
    except PermissionError:
        return "unreadable: permission denied", None, False
    except Exception as e:  # a checker reports whatever stops the decode (permissions included)
        msg = " ".join(str(e).split())
        if "truncated" in msg.lower() or isinstance(e, EOFError) or _cut_short(path):
            return "truncated", None, False  # "image file is truncated", "Truncated File Read", or cut in the header
        if isinstance(e, UnidentifiedImageError):
            return "unreadable: not an image PIL can identify", None, False
        return f"unreadable: {type(e).__name__}: {msg}", None, False
    ext = os.path.splitext(path)[1]
    problem = note = None
    if fmt not in _EXT_FORMATS.get(ext.lower(), {fmt}):
        problem = f"mislabeled: {fmt} named {ext}"
    if fmt in ("JPEG", "MPO") and mode == "CMYK":
        note = "note: cmyk JPEG (PIL converts it to RGB; some GPU JPEG decoders reject it)"
    return problem, note, fmt in _DALI_FORMATS


def _init_worker() -> None:
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a worker started by spawn re-imports PIL: be explicit


def _fix_list_path(out: str, split: str, several: bool) -> str:
    if "{split}" in out:
        return out.replace("{split}", split)
    if not several:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}.{split}{ext}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m imnet.data.check", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="dataset folder: ROOT/{train,val}/<class>/* or ROOT/<class>/*")
    p.add_argument("--fix-list", metavar="OUT.txt",
                   help="write the good files as 'relative/path label' lines (DALI file_list), one list per split")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="decoding processes (default: min(8, CPU count))")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    try:
        splits = find_splits(args.root)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # ROOT itself cannot be listed
        print(f"error: {e.filename or args.root}: {_reason(e)}", file=sys.stderr)
        return 2

    problems = 0
    out = sys.stdout
    for s in splits:  # folder-level findings first
        for folder, reason in s.unreadable:
            out.write(f"{folder}\tunreadable folder: {reason}\n")
            problems += 1
        if s.loose:
            hint = f"python -m imnet.data.sort_val --val-dir {s.folder} --labels LABELS" if s.name == "val" else \
                "move them into class folders"
            out.write(f"{s.folder}\tunsorted: {s.loose} image files directly in the split folder ({hint})\n")
            problems += 1
        used = {label for _, label in s.files}
        unlisted = {folder for folder, _ in s.unreadable}  # already reported: not "empty" too
        for label, cls in enumerate(s.classes):
            if label not in used and os.path.join(s.folder, cls) not in unlisted:
                out.write(f"{os.path.join(s.folder, cls)}\tempty class: no image files\n")
                problems += 1
    if len({tuple(s.classes) for s in splits}) > 1:
        print("note: the splits have different class folders, so the same label means different classes; "
              "training refuses this layout", file=sys.stderr)

    paths = [os.path.join(s.folder, rel) for s in splits for rel, _ in s.files]
    good: list[bool] = []
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # restored below: main() may run inside another program
    pool = mp.Pool(args.workers, initializer=_init_worker) if args.workers > 1 and len(paths) > 1 else None
    try:
        results = pool.imap(check_file, paths, chunksize=64) if pool else map(check_file, paths)
        for n, (path, (problem, note, dali_ok)) in enumerate(zip(paths, results), 1):
            if problem:
                out.write(f"{path}\t{problem}\n")
                problems += 1
            if note:
                out.write(f"{path}\t{note}\n")
            good.append(dali_ok)
            if n % _PROGRESS_EVERY == 0:
                print(f"  {n}/{len(paths)} files checked", file=sys.stderr, flush=True)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
        if pool:
            pool.close()
            pool.join()
    out.flush()

    if args.fix_list:
        k = 0
        for s in splits:
            target = _fix_list_path(args.fix_list, s.name or "all", len(splits) > 1)
            lines = []
            for rel, label in s.files:
                ok, k = good[k], k + 1
                if ok and not any(c.isspace() for c in rel):
                    lines.append(f"{rel} {label}\n")
                elif ok:
                    print(f"note: left out of the fix list (whitespace in the path): {rel}", file=sys.stderr)
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            with open(target, "w") as f:
                f.writelines(lines)
            print(f"wrote {len(lines)} of {len(s.files)} files{' of ' + s.name if s.name else ''} to {target} "
                  f"(paths relative to {s.folder})", file=sys.stderr)

    n_classes = len({c for s in splits for c in s.classes})
    print(f"checked {len(paths)} files in {n_classes} classes: {problems} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
