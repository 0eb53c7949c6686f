"""A training run through the CLI on each loader and dataset format, and the bad-image policies."""

import os

import numpy as np
import pytest
from conftest import metrics, run, single
from data_helpers import write_jpeg_tree, write_tiny_imagenet
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def write_noise_tree(root, classes=2, n_train=8, n_val=3, size=(40, 30)):
    """An ImageNet tree of noise JPEGs, class c brighter by 120 c: learnable in a few steps."""
    rng = np.random.default_rng(0)

    def image(split, c, k):
        return Image.fromarray((rng.integers(0, 60, (size[1], size[0], 3)) + 120 * c).astype(np.uint8))

    return write_jpeg_tree(root, [f"n{c:08d}" for c in range(classes)], {"train": n_train, "val": n_val}, image,
                           name="{split}_{c}_{k}.JPEG", quality=90)


def common(tmp_path, name, *more):
    return [f"run.out_dir={tmp_path}", f"run.name={name}", "log.progress=false", "run.epochs=2",
            "model.gn_groups=8", *more]


def last_val(run_dir):
    return [r for r in metrics(run_dir) if r["split"] == "val"][-1]


def test_gpu_resident_loader_trains(tmp_path):
    out = run(single("imnet.train", "--config", "configs/digits_gn.yaml", "data.loader=gpu",
                     *common(tmp_path, "gpu")))
    assert "final val top1" in out.stdout
    assert last_val(tmp_path / "gpu")["n"] == 360
    assert last_val(tmp_path / "gpu")["top1"] > 0.5


def test_imagenet_folder_with_a_truncated_jpeg(tmp_path):
    root = write_noise_tree(str(tmp_path / "inet"))
    bad = os.path.join(root, "train", "n00000001", "train_1_3.JPEG")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])
    args = ["data.name=imagenet", f"data.root={root}", "data.image_size=32", "data.batch_size=4"]
    p = run(single("imnet.train", *args, *common(tmp_path, "err")), check=False)
    assert p.returncode != 0 and f"bad image {bad}" in p.stderr
    out = run(single("imnet.train", *args, "data.on_bad_image=skip", *common(tmp_path, "skip")))
    assert f"skipped bad image {bad}" in out.stderr
    rows = metrics(tmp_path / "skip")
    assert [r["step"] for r in rows if r["split"] == "val"] == [4, 8]  # 16 images / 4 = 4 steps an epoch
    assert last_val(tmp_path / "skip")["n"] == 6


def test_tiny_imagenet_and_h5_through_the_cli(tmp_path):
    rng = np.random.default_rng(1)
    train, val = {}, []
    for c, w in enumerate(("n01", "n02")):
        train[w] = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(8)]
        val += [(f"val_{c}_{i}.JPEG", w, Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
                for i in range(2)]
    root = write_tiny_imagenet(tmp_path / "tiny", list(train), train, val, quality=75)
    run(single("imnet.train", "data.name=tiny_imagenet", f"data.root={root}", "data.batch_size=4",
               "data.loader=gpu", *common(tmp_path, "tiny")))
    assert last_val(tmp_path / "tiny")["n"] == 4
    out = tmp_path / "h5"
    run(single("imnet.data.convert", "--dataset", "tiny_imagenet", "--root", str(root), "--out", str(out)))
    assert sorted(os.listdir(out)) == ["train.h5", "val.h5"]
    run(single("imnet.train", "data.name=h5", f"data.root={out}", "data.batch_size=4", "data.workers=2",
               *common(tmp_path, "h5")))
    assert last_val(tmp_path / "h5")["n"] == 4


def test_dali_loader_trains_on_2_ranks(tmp_path):
    from conftest import torchrun

    root = write_noise_tree(str(tmp_path / "inet"), n_train=10, n_val=3, size=(50, 40))
    run(torchrun(2, "imnet.train", "data.name=imagenet", f"data.root={root}", "data.image_size=32",
                 "data.batch_size=4", "data.loader=dali", "model.channels_last=true", *common(tmp_path, "dali")))
    rows = metrics(tmp_path / "dali")
    assert [r["step"] for r in rows if r["split"] == "val"] == [2, 4]  # 20 images / (2 x 4) = 2 steps an epoch
    assert last_val(tmp_path / "dali")["n"] == 6
