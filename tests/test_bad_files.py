"""Bad image files: the check CLI, the error | skip policy, and sorting the flat ImageNet val folder."""

import io
import os

import numpy as np
import pytest
import torch
from conftest import deny, run, single
from data_helpers import write_jpeg_tree
from PIL import Image
from torch.utils.data import DataLoader

from imnet.data import check, sort_val
from imnet.data.bad import BadImagePolicy
from imnet.data.datasets import build_dataset

CLASSES = ("n01440764", "n01443537")  # sorted: label 0, label 1
SIZE = 16  # px the dataset yields


def picture(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((24, 32, 3)) * 255).astype(np.uint8))


def jpeg_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    picture(seed).save(buf, fmt)
    return buf.getvalue()


def make_tree(root, bad: bool = True) -> dict[str, str]:
    """root/{train,val}/<wnid>/ with 3 good JPEGs per class; with `bad`, three bad files:
    train/<cls0>/..._trunc.JPEG (first half of a JPEG), train/<cls1>/..._empty.JPEG (0 bytes),
    val/<cls0>/..._png.JPEG (a PNG). Returns {kind: path}."""
    write_jpeg_tree(root, CLASSES, {"train": 3, "val": 3}, lambda split, c, k: picture(100 * c + k), quality=75)
    if not bad:
        return {}
    paths = {"truncated": root / "train" / CLASSES[0] / f"{CLASSES[0]}_trunc.JPEG",
             "empty": root / "train" / CLASSES[1] / f"{CLASSES[1]}_empty.JPEG",
             "png": root / "val" / CLASSES[0] / f"{CLASSES[0]}_png.JPEG"}
    data = jpeg_bytes(7)
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["empty"].write_bytes(b"")
    paths["png"].write_bytes(jpeg_bytes(8, "PNG"))
    return {k: str(v) for k, v in paths.items()}


def findings(stdout: str) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in stdout.splitlines())


# ------------------------------------------------------------------------------------- check


def test_check_finds_the_bad_files(tmp_path, capsys):
    bad = make_tree(tmp_path)
    assert check.main([str(tmp_path), "--workers", "2"]) == 1
    out, err = capsys.readouterr()
    assert findings(out) == {bad["truncated"]: "truncated", bad["empty"]: "empty",
                             bad["png"]: "mislabeled: PNG named .JPEG"}
    assert "checked 15 files in 2 classes: 3 problems" in err


def test_check_clean_tree_and_class_root(tmp_path, capsys):
    make_tree(tmp_path, bad=False)
    assert check.main([str(tmp_path), "--workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "checked 12 files in 2 classes: 0 problems" in err
    assert check.main([str(tmp_path / "train")]) == 0  # a folder that directly holds class folders
    assert "checked 6 files in 2 classes: 0 problems" in capsys.readouterr().err
    cmyk = tmp_path / "train" / CLASSES[0] / "cmyk.JPEG"
    Image.new("CMYK", (20, 20), (10, 20, 30, 40)).save(cmyk)
    assert check.main([str(tmp_path)]) == 0  # a note is not a problem
    out, err = capsys.readouterr()
    assert findings(out) == {str(cmyk): "note: cmyk JPEG (PIL converts it to RGB; some GPU JPEG decoders reject it)"}
    assert "checked 13 files in 2 classes: 0 problems" in err


def test_check_subprocess(tmp_path):
    bad = make_tree(tmp_path)
    p = run(single("imnet.data.check", str(tmp_path), "--workers", "2"), check=False, timeout=120)
    assert p.returncode == 1, p.stderr
    assert set(findings(p.stdout)) == set(bad.values())
    assert "3 problems" in p.stderr


def test_fix_list_holds_the_decodable_files(tmp_path, capsys):
    bad = make_tree(tmp_path)
    out = tmp_path / "lists" / "good.txt"
    assert check.main([str(tmp_path), "--fix-list", str(out), "--workers", "2"]) == 1
    capsys.readouterr()
    train = (tmp_path / "lists" / "good.train.txt").read_text().splitlines()
    val = (tmp_path / "lists" / "good.val.txt").read_text().splitlines()
    good = [f"{wnid}/{wnid}_{k}.JPEG {c}" for c, wnid in enumerate(CLASSES) for k in range(3)]
    assert train == good  # the truncated and the empty file are left out, ImageFolder order
    # The PNG named .JPEG is kept: it decodes (PIL, and DALI's decoders.image sniffs the content),
    # so DALI and the torch loader train on the same images. Its label is its class folder's index.
    assert sorted(val) == sorted(good + [f"{CLASSES[0]}/{CLASSES[0]}_png.JPEG 0"])
    for line in train + val:  # every listed path exists relative to its split folder
        rel = line.split()[0]
        assert os.path.isfile(tmp_path / ("train" if line in train else "val") / rel)
    assert os.path.basename(bad["png"]) in "\n".join(val)


def test_check_reports_unsorted_val_and_unreadable(tmp_path, capsys):
    make_tree(tmp_path, bad=False)
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg_bytes(1))
    (tmp_path / "train" / CLASSES[1] / "notes.JPEG").write_text("not an image at all")
    assert check.main([str(tmp_path)]) == 1
    got = findings(capsys.readouterr().out)
    assert got[str(tmp_path / "val")].startswith("unsorted: 1 image files")
    assert "imnet.data.sort_val" in got[str(tmp_path / "val")]
    assert got[str(tmp_path / "train" / CLASSES[1] / "notes.JPEG")].startswith("unreadable: ")



def test_check_reports_unreadable_folders_and_files(tmp_path, capsys, monkeypatch):
    make_tree(tmp_path, bad=False)
    cls_dir, val_dir = tmp_path / "train" / CLASSES[1], tmp_path / "val"
    image = tmp_path / "train" / CLASSES[0] / f"{CLASSES[0]}_1.JPEG"
    deny(monkeypatch, cls_dir, val_dir, image)
    assert check.main([str(tmp_path), "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    assert findings(out) == {str(cls_dir): "unreadable folder: permission denied",
                             str(val_dir): "unreadable folder: permission denied",
                             str(image): "unreadable: permission denied"}
    assert "checked 3 files in 2 classes: 3 problems" in err
    root = tmp_path / "train"  # a folder of class folders, itself unreadable
    deny(monkeypatch, root)
    assert check.main([str(root), "--workers", "1"]) == 2
    assert capsys.readouterr().err == f"error: {root}: permission denied\n"


# ------------------------------------------------------------------------------ BadImagePolicy


def test_error_policy_names_the_file(tmp_path):
    bad = make_tree(tmp_path)
    ds, _ = build_dataset("imagenet", str(tmp_path), "train", augment=True, image_size=SIZE)
    wrapped = BadImagePolicy(ds, "error")
    assert len(wrapped) == len(ds) == 8 and wrapped.classes == list(CLASSES)
    assert torch.equal(wrapped.targets, ds.targets)
    paths = [ds.path(i) for i in range(len(ds))]
    for kind in ("truncated", "empty"):
        i = paths.index(bad[kind])
        for key in (i, (i, 123)):
            with pytest.raises(RuntimeError, match="bad image") as e:
                wrapped[key]
            msg = str(e.value)
            assert bad[kind] in msg and "data.on_bad_image=skip" in msg
            assert f"python -m imnet.data.check {tmp_path / 'train'}" in msg
    assert "truncated" in str(_raised(wrapped, paths.index(bad["truncated"]))).lower()
    assert "empty file" in str(_raised(wrapped, paths.index(bad["empty"])))
    good = next(i for i, p in enumerate(paths) if p not in bad.values())
    x, y = wrapped[(good, 5)]
    assert x.shape == (3, SIZE, SIZE) and y == ds.targets[good]


def _raised(ds, key) -> Exception:
    with pytest.raises(RuntimeError) as e:
        ds[key]
    return e.value


def test_png_named_jpeg_is_not_bad_for_training(tmp_path):
    bad = make_tree(tmp_path)
    ds, _ = build_dataset("imagenet", str(tmp_path), "val", augment=False, image_size=SIZE)
    wrapped = BadImagePolicy(ds, "error")
    i = [ds.path(k) for k in range(len(ds))].index(bad["png"])
    x, y = wrapped[i]
    assert x.shape == (3, SIZE, SIZE) and y == 0


def test_skip_policy_replaces_with_a_neighbour(tmp_path):
    bad = make_tree(tmp_path)
    ds, _ = build_dataset("imagenet", str(tmp_path), "train", augment=True, image_size=SIZE)
    messages = []
    wrapped = BadImagePolicy(ds, "skip", log=messages.append)
    paths = [ds.path(i) for i in range(len(ds))]
    bad_idx = sorted(paths.index(bad[k]) for k in ("truncated", "empty"))
    for epoch in range(2):  # the second pass does not decode or log the known bad files again
        for i in range(len(wrapped)):
            x, y = wrapped[(i, 1000 + i)]
            assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32 and torch.isfinite(x).all()
            if i in bad_idx:  # the next index, with the same sample seed
                j = (i + 1) % len(ds)
                assert torch.equal(x, ds[(j, 1000 + i)][0]) and y == ds.targets[j]
        assert wrapped.skipped == 2 * (epoch + 1)
    assert sorted(wrapped.bad) == bad_idx
    assert len(messages) == 2
    for kind in ("truncated", "empty"):
        assert sum(m.startswith(f"skipped bad image {bad[kind]}: ") for m in messages) == 1


def test_skip_keeps_the_sample_count(tmp_path):
    make_tree(tmp_path)
    ds, _ = build_dataset("imagenet", str(tmp_path), "train", augment=True, image_size=SIZE)
    wrapped = BadImagePolicy(ds, "skip")
    keys = [(i, 7 * i) for i in range(len(ds))]
    for workers in (0, 2):
        loader = DataLoader(wrapped, batch_size=3, sampler=keys, num_workers=workers)
        sizes = [x.shape[0] for x, y in loader]
        assert sum(sizes) == len(ds) == 8 and sizes == [3, 3, 2]
    assert wrapped.skipped == 2  # the workers=0 pass ran here; the workers counted in their own process


def test_policy_limits(tmp_path):
    class AllBad(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, key):
            raise OSError("image file is truncated (3 bytes not processed)")

    with pytest.raises(RuntimeError, match="index 1 and its 50 next neighbours"):
        BadImagePolicy(AllBad(), "skip")[1]
    with pytest.raises(ValueError, match="data.on_bad_image"):
        BadImagePolicy(AllBad(), "ignore")
    # A missing file is a disk/mount problem, not a bad image: it propagates under skip.
    make_tree(tmp_path, bad=False)
    ds, _ = build_dataset("imagenet", str(tmp_path), "train", augment=False, image_size=SIZE)
    os.remove(ds.path(0))
    with pytest.raises(FileNotFoundError):
        BadImagePolicy(ds, "skip")[0]


# ----------------------------------------------------------------------------------- sort_val

VAL_LABELS = {f"ILSVRC2012_val_{i:08d}": CLASSES[i % 2] for i in range(1, 7)}


def flat_val(tmp_path):
    d = tmp_path / "val"
    d.mkdir()
    for name in VAL_LABELS:
        (d / f"{name}.JPEG").write_bytes(b"jpeg " + name.encode())
    return d


def snapshot(d) -> list[str]:
    return sorted(os.path.relpath(os.path.join(p, f), d) for p, _, fs in os.walk(d) for f in fs)


def sorted_layout() -> list[str]:
    return sorted(f"{wnid}/{name}.JPEG" for name, wnid in VAL_LABELS.items())


def write_csv(path, labels):
    rows = [f"{name},{wnid} 10 20 30 40 {wnid} 1 2 3 4" for name, wnid in labels.items()]
    path.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")


def write_txt(path, labels):
    path.write_text("".join(f"{name}.JPEG {wnid}\n" for name, wnid in labels.items()))


def write_valprep(path, labels):  # the widely shared valprep.sh
    path.write_text("#!/bin/bash\n" + "".join(f"mkdir -p {w}\n" for w in CLASSES) +
                    "".join(f"mv {name}.JPEG {wnid}/\n" for name, wnid in labels.items()))


@pytest.mark.parametrize("write", [write_csv, write_txt, write_valprep])
def test_sort_val_sorts_and_is_idempotent(tmp_path, capsys, write):
    d = flat_val(tmp_path)
    write(tmp_path / "labels", VAL_LABELS)
    args = ["--val-dir", str(d), "--labels", str(tmp_path / "labels")]
    assert sort_val.main(args + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert snapshot(d) == sorted(f"{n}.JPEG" for n in VAL_LABELS)  # nothing moved
    assert f"would move ILSVRC2012_val_00000001.JPEG -> {CLASSES[1]}/ILSVRC2012_val_00000001.JPEG" in out
    assert "dry run: would move 6 files into 2 class folders" in out
    assert sort_val.main(args) == 0
    assert f"moved 6 files into 2 class folders under {d} (0 already in place)" in capsys.readouterr().out
    assert snapshot(d) == sorted_layout()
    assert (d / CLASSES[0] / "ILSVRC2012_val_00000002.JPEG").read_bytes() == b"jpeg ILSVRC2012_val_00000002"
    assert sort_val.main(args) == 0  # re-run: nothing to do, says so
    assert "nothing to do: all 6 labeled files are already in their class folders" in capsys.readouterr().out
    assert snapshot(d) == sorted_layout()


def test_sort_val_refuses_missing_labels(tmp_path, capsys):
    d = flat_val(tmp_path)
    before = snapshot(d)
    labels = dict(VAL_LABELS)
    del labels["ILSVRC2012_val_00000004"]
    write_txt(tmp_path / "short.txt", labels)  # a file without a label
    assert sort_val.main(["--val-dir", str(d), "--labels", str(tmp_path / "short.txt")]) == 1
    err = capsys.readouterr().err
    assert "1 files in the folder have no label: ILSVRC2012_val_00000004.JPEG" in err and "Nothing was moved" in err
    assert snapshot(d) == before
    write_txt(tmp_path / "long.txt", {**VAL_LABELS, "ILSVRC2012_val_00000099": CLASSES[0]})  # a missing file
    assert sort_val.main(["--val-dir", str(d), "--labels", str(tmp_path / "long.txt")]) == 1
    assert "ILSVRC2012_val_00000099" in capsys.readouterr().err
    assert snapshot(d) == before
    # --allow-missing sorts what it can and leaves the unlabeled file in place
    assert sort_val.main(["--val-dir", str(d), "--labels", str(tmp_path / "short.txt"), "--allow-missing"]) == 0
    assert "warning: 1 files in the folder have no label" in capsys.readouterr().err
    assert snapshot(d) == sorted(["ILSVRC2012_val_00000004.JPEG"] +
                                 [p for p in sorted_layout() if "00000004" not in p])


def test_sort_val_then_check_and_train_read_it(tmp_path, capsys):
    make_tree(tmp_path, bad=False)
    d = tmp_path / "val"
    for wnid in CLASSES:  # flatten val as distributed
        for f in os.listdir(d / wnid):
            os.rename(d / wnid / f, d / f)
        os.rmdir(d / wnid)
    write_txt(tmp_path / "labels.txt", {f[:-5]: f.split("_")[0] for f in os.listdir(d)})
    assert check.main([str(tmp_path)]) == 1  # the unsorted val folder is a problem
    assert sort_val.main(["--val-dir", str(d), "--labels", str(tmp_path / "labels.txt")]) == 0
    assert check.main([str(tmp_path)]) == 0
    capsys.readouterr()
    ds, info = build_dataset("imagenet", str(tmp_path), "val", augment=False, image_size=SIZE)
    assert len(ds) == 6 and info.num_classes == 2 and ds.targets.tolist() == [0, 0, 0, 1, 1, 1]
