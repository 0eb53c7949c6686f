"""imnet.download: clear one-line failures without a network, and no partial files left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.error import URLError

import pytest

from imnet import download
from imnet.data.datasets import build_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, isolate: bool) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess; isolate=True runs it in a network namespace with no interface up."""
    cmd = [sys.executable, "-m", "imnet.download", *args]
    if isolate:
        cmd = ["unshare", "-n", *cmd]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(150)
def test_offline_download_fails_cleanly(tmp_path):
    root = tmp_path / "data"
    proc = run_cli("--dataset", "mnist", "--root", str(root), isolate=True)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MNIST" in errors[0], proc.stderr
    assert "ossci-datasets.s3.amazonaws.com" in errors[0]  # names the host it could not reach
    assert not root.exists(), "a failed download left files behind"
    with pytest.raises(FileNotFoundError, match="download"):
        build_dataset("mnist", str(root), "train", augment=False)


@pytest.mark.timeout(150)
def test_unknown_dataset_lists_choices(tmp_path):
    proc = run_cli("--dataset", "MNSIT", "--root", str(tmp_path), isolate=False)
    assert proc.returncode != 0
    assert "MNSIT" in proc.stderr
    for choice in ("MNIST", "Fashion", "SVHN", "CIFAR10"):
        assert choice in proc.stderr


def test_failed_attempt_removes_only_what_it_created(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    keep = root / "MNIST" / "raw" / "earlier.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("from an earlier run")

    def flaky(r):  # writes a partial archive and a new folder, then loses the connection
        os.makedirs(os.path.join(r, "MNIST", "processed"))
        with open(os.path.join(r, "MNIST", "raw", "train-images-idx3-ubyte.gz"), "wb") as fh:
            fh.write(b"partial")
        raise URLError("connection reset")

    monkeypatch.setitem(download.DATASETS, "MNIST", (flaky, *download.DATASETS["MNIST"][1:]))
    assert download.main(["--dataset", "mnist", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MNIST" in err and "connection reset" in err
    assert sorted(p.name for p in (root / "MNIST").rglob("*")) == ["earlier.txt", "raw"]


def test_names_are_case_insensitive_and_deduplicated(tmp_path, monkeypatch):
    calls = []
    for name, (_, owned, source) in list(download.DATASETS.items()):
        monkeypatch.setitem(download.DATASETS, name, (lambda r, n=name: calls.append(n), owned, source))
    assert download.main(["--dataset", "cifar10", "mnist", "FASHION", "svhn", "Mnist", "--root", str(tmp_path)]) == 0
    assert calls == ["CIFAR10", "MNIST", "Fashion", "SVHN"]


def test_imagenet_explains_how_to_get_it(tmp_path, capsys):
    assert download.main(["--dataset", "imagenet", "--root", str(tmp_path)]) == 1
    assert "image-net.org" in capsys.readouterr().err
