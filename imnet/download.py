"""Download the small datasets into the layout `imnet.data.datasets.build_dataset` reads.

    python -m imnet.download --dataset MNIST Fashion SVHN CIFAR10 [--root data]

Uses torchvision's own downloaders (download=True), so the files land exactly where torchvision
reads them: <root>/MNIST/raw, <root>/FashionMNIST/raw, <root>/cifar-10-batches-py,
<root>/{train,test}_32x32.mat. A failed download removes whatever it created, so a half-written
file is never mistaken for a dataset. ImageNet cannot be downloaded automatically (registration
at https://image-net.org); `--dataset ImageNet` prints how to get it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from urllib.error import URLError

from torchvision import datasets as tvd
from torchvision.datasets import utils as tvu

from imnet.data.datasets import DOWNLOAD_NAMES, IMAGENET_HELP


def _mnist(root: str) -> None:
    tvd.MNIST(root, train=True, download=True)  # fetches all four idx files, train and test


def _fashion(root: str) -> None:
    tvd.FashionMNIST(root, train=True, download=True)


def _cifar10(root: str) -> None:
    # the archive only (one tarball holds both splits), md5-checked: tvd.CIFAR10(download=True) would then
    # read the batches with pickle.load, and imnet reads data pickles only through data/safe_pickle.py
    if not os.path.isdir(os.path.join(root, tvd.CIFAR10.base_folder)):
        tvu.download_and_extract_archive(tvd.CIFAR10.url, root, filename=tvd.CIFAR10.filename, md5=tvd.CIFAR10.tgz_md5)


def _svhn(root: str) -> None:
    for split in ("train", "test"):  # one .mat file per split
        tvd.SVHN(root, split=split, download=True)


# CLI name -> (downloader, the paths under root it owns: cleaned up when an attempt fails, where
# the files come from: named in the error message).
DATASETS: dict[str, tuple[Callable[[str], None], tuple[str, ...], str]] = {
    "MNIST": (_mnist, ("MNIST",), " or ".join(tvd.MNIST.mirrors)),
    "Fashion": (_fashion, ("FashionMNIST",), " or ".join(tvd.FashionMNIST.mirrors)),
    "SVHN": (_svhn, ("train_32x32.mat", "test_32x32.mat"), os.path.dirname(tvd.SVHN.split_list["train"][0])),
    "CIFAR10": (_cifar10, ("cifar-10-batches-py", "cifar-10-python.tar.gz"), tvd.CIFAR10.url),
}
assert set(DATASETS) == set(DOWNLOAD_NAMES.values())
_NOT_DOWNLOADABLE = ("ImageNet",)


def _snapshot(root: str, owned: tuple[str, ...]) -> set[str]:
    """Every file and folder that exists now under the owned paths (and the root itself)."""
    seen = {root} if os.path.exists(root) else set()
    for rel in owned:
        top = os.path.join(root, rel)
        if os.path.lexists(top):
            seen.add(top)
        for dirpath, dirnames, filenames in os.walk(top):
            seen.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return seen


def _remove_new(root: str, owned: tuple[str, ...], before: set[str]) -> None:
    """Delete files and now-empty folders that this attempt created; pre-existing ones stay."""
    for path in sorted(_snapshot(root, owned) - before, key=len, reverse=True):  # deepest first
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)  # only succeeds when empty, i.e. nothing pre-existing inside
            else:
                os.remove(path)
        except OSError:
            pass


def _one_line(err: BaseException) -> str:
    """torchvision's multi-line mirror reports -> one line; URLError -> its reason."""
    text = str(err.reason) if isinstance(err, URLError) else str(err)
    return " ".join(text.split()) or type(err).__name__


def download(name: str, root: str) -> bool:
    """Download one dataset; on a network/IO failure print one line to stderr and return False."""
    fetch, owned, source = DATASETS[name]
    before = _snapshot(root, owned)
    try:
        fetch(root)
    except (URLError, OSError, RuntimeError) as err:  # unreachable host, bad checksum, disk
        _remove_new(root, owned, before)
        print(f"error: could not download {name} from {source} into {os.path.abspath(root)}: {_one_line(err)} "
              f"(check the network connection or proxy; nothing was left behind)", file=sys.stderr)
        return False
    except BaseException:  # Ctrl-C or a bug: still leave no half-written files, then re-raise
        _remove_new(root, owned, before)
        raise
    print(f"{name}: ready under {os.path.abspath(root)}")
    return True


def _canonical(value: str) -> str:
    """Case-insensitive dataset names; an unknown one is returned as-is for argparse to reject."""
    lookup = {n.lower(): n for n in (*DATASETS, *_NOT_DOWNLOADABLE)}
    return lookup.get(value.lower(), value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imnet.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", nargs="+", required=True, type=_canonical,
                        choices=[*DATASETS, *_NOT_DOWNLOADABLE], help="datasets to fetch (case-insensitive)")
    parser.add_argument("--root", default="data", help="data folder, the same one given to training (default: data)")
    args = parser.parse_args(argv)

    ok = True
    for name in dict.fromkeys(args.dataset):  # de-duplicated, order kept
        if name in _NOT_DOWNLOADABLE:
            print(f"error: {name}: {IMAGENET_HELP.format(root=args.root)}", file=sys.stderr)
            ok = False
            continue
        ok = download(name, args.root) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
