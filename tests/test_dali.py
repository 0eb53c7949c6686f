"""DALI CPU pipelines (imnet.data.dali) on small JPEG trees written with PIL: sharding, epochs, resume,
layouts, validation counts, and pixel parity with the torch loader on the same files.

Two ranks are simulated in one process with two Dist objects: DALI sharding needs no process group.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import sklearn.datasets
import torch
from data_helpers import write_jpeg_tree, write_tiny_imagenet
from PIL import Image

from imnet import config
from imnet.data import dali
from imnet.data import transforms as tf
from imnet.data.core import DatasetInfo
from imnet.data.datasets import build_dataset
from imnet.data.samplers import TrainSampler
from imnet.dist import Dist

S = 32                                   # px: image_size of the small tests
CLASSES = ("n01", "n02", "n03")          # sorted class folders -> labels 0, 1, 2
N_TRAIN, N_VAL = 8, 7                    # images per class
SIZES = [(80, 60), (50, 90), (97, 71), (64, 64), (120, 45), (33, 77), (100, 100), (61, 83)]  # (w, h) px
LEVEL = 1 / 255 / min(tf.IMAGENET_STD)   # one 0..255 pixel level in normalized units (0.0175)


def picture(w: int, h: int, seed: int) -> Image.Image:
    """Smooth colour gradients plus noise: resampling and crop offsets show in the pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx * 3 + yy * 5 + seed * 40) % 255], -1)
    img = img + rng.normal(0, 12, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def write_imagenet(root) -> str:
    return write_jpeg_tree(root, CLASSES, {"train": N_TRAIN, "val": N_VAL},
                           lambda split, c, i: picture(*SIZES[(i + c) % len(SIZES)], seed=100 * c + i), quality=90)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> str:
    return write_imagenet(tmp_path_factory.mktemp("imagenet"))


def make_cfg(root: str, *more: str, name: str = "imagenet"):
    size = [f"data.image_size={S}"] if name == "imagenet" else []
    return config.load(None, [f"data.name={name}", f"data.root={root}", "data.loader=dali", "data.batch_size=4",
                              "model.norm=bn", "run.seed=3", *size, *more])


def build(cfg, dist: Dist, split: str, **kw):
    """dali.build for a whole Config, as imnet.data.build calls it."""
    return dali.build(cfg.data, dist, split, seed=cfg.run.seed, channels_last=cfg.model.channels_last, **kw)


def rank(r: int = 0, world: int = 1) -> Dist:
    return Dist(r, world, r, torch.device("cpu"), None, "single")


def one_pass(loader) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """(images, labels, file indices) of each batch of one pass, copied out of DALI's buffers."""
    return [(x.clone(), y.clone(), loader.last_indices.tolist()) for x, y in loader]


def ids_of(batches) -> list[int]:
    return [i for _, _, ids in batches for i in ids]


def file_labels(root: str, split: str) -> list[int]:
    return dali.list_files("imagenet", root, split)[1]


# ------------------------------------------------------------------------------------------ import


def test_importing_imnet_does_not_import_dali():
    code = ("import sys, imnet, imnet.data, imnet.data.dali; "
            "assert not [m for m in sys.modules if m.startswith('nvidia.dali')], 'DALI imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------- train


def test_train_shards_are_disjoint_cover_the_set_and_match_the_torch_sampler(imagenet):
    cfg = make_cfg(imagenet)
    labels = file_labels(imagenet, "train")
    seen = []
    for r in range(2):
        loader = build(cfg, rank(r, 2), "train")
        assert len(loader) == 3  # 24 images // (2 ranks x 4)
        batches = one_pass(loader)
        assert len(batches) == 3
        for x, y, ids in batches:
            assert x.shape == (4, 3, S, S) and x.dtype == torch.float32 and x.is_contiguous()
            assert y.shape == (4,) and y.dtype == torch.int64
            assert y.tolist() == [labels[i] for i in ids] and set(y.tolist()) <= {0, 1, 2}
            assert torch.isfinite(x).all() and -2.2 < x.min() < x.max() < 2.7  # ImageNet-normalized range
        # the very same files in the same order as the torch loader's sampler
        torch_order = TrainSampler(len(labels), r, 2, 4, seed=3)
        torch_order.set_epoch(0)
        assert ids_of(batches) == [i for i, _ in torch_order]
        seen.append(ids_of(batches))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(3 * N_TRAIN))


def test_train_ranks_take_equal_steps_and_the_dropped_tail_changes(imagenet):
    cfg = make_cfg(imagenet, "data.batch_size=5")  # 24 images // (2 x 5) = 2 steps, 4 images dropped
    loaders = [build(cfg, rank(r, 2), "train") for r in range(2)]
    used = []
    for epoch in range(4):
        ids = []
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
            batches = one_pass(loader)
            assert len(loader) == 2 and len(batches) == 2 and all(len(y) == 5 for _, y, _ in batches)
            ids += ids_of(batches)
        assert len(set(ids)) == 20
        used.append(set(ids))
    assert len({frozenset(u) for u in used}) > 1           # a different tail each epoch ...
    assert set.union(*used) == set(range(3 * N_TRAIN))      # ... so no image is left out for good


def test_epochs_reshuffle_and_the_seed_reproduces(imagenet):
    loader = build(make_cfg(imagenet), rank(), "train")
    e0, e1 = one_pass(loader), one_pass(loader)  # iterating again is the next epoch
    assert ids_of(e0) != ids_of(e1) and sorted(ids_of(e0)) == sorted(ids_of(e1))
    # the same file is augmented differently in another epoch
    f = e0[0][2][0]
    pos = ids_of(e1).index(f)
    assert not torch.equal(e0[0][0][0], e1[pos // 4][0][pos % 4])
    # a fresh loader with the same seed (any number of DALI threads) gives the same first batch
    for workers in (0, 1):
        x, y, ids = one_pass(build(make_cfg(imagenet, f"data.workers={workers}"), rank(), "train"))[0]
        assert ids == e0[0][2] and torch.equal(y, e0[0][1]) and torch.equal(x, e0[0][0])
    other = one_pass(build(make_cfg(imagenet, "run.seed=4"), rank(), "train"))
    assert ids_of(other) != ids_of(e0)


def test_resume_mid_epoch_is_bit_identical(imagenet):
    cfg = make_cfg(imagenet)
    full_loader = build(cfg, rank(), "train")
    full_loader.sampler.set_epoch(1)
    full = one_pass(full_loader)
    assert len(full) == 6
    resumed = build(cfg, rank(), "train")
    resumed.sampler.set_epoch(1, start_batch=2)
    assert len(resumed) == 4
    rest = one_pass(resumed)
    assert len(rest) == 4
    for (x, y, ids), (x0, y0, ids0) in zip(rest, full[2:]):
        assert ids == ids0 and torch.equal(y, y0) and torch.equal(x, x0)
    # negative control: the same position in another epoch is another batch
    resumed.sampler.set_epoch(2, start_batch=2)
    assert ids_of(one_pass(resumed)) != ids_of(full[2:])


def test_an_unfinished_pass_does_not_disturb_the_next_epoch(imagenet):
    cfg = make_cfg(imagenet)
    loader = build(cfg, rank(), "train")
    it = iter(loader)
    next(it)  # the training loop stops at steps_per_epoch without exhausting the loader
    loader.sampler.set_epoch(1)
    got = one_pass(loader)
    fresh = build(cfg, rank(), "train")
    fresh.sampler.set_epoch(1)
    want = one_pass(fresh)
    assert [ids for *_, ids in got] == [ids for *_, ids in want]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, want))


def test_held_batches_stay_valid(imagenet):
    """Gradient accumulation holds several batches at once: DALI must not reuse their memory."""
    loader = build(make_cfg(imagenet), rank(), "train")
    held = [(x, x.clone(), y, y.clone()) for x, y in loader]
    assert len(held) == 6 and all(torch.equal(x, x0) and torch.equal(y, y0) for x, x0, y, y0 in held)


def test_channels_last_is_the_same_nchw_tensor(imagenet):
    for split in ("train", "val"):
        plain = one_pass(build(make_cfg(imagenet), rank(), split))[0][0]
        cl = one_pass(build(make_cfg(imagenet, "model.channels_last=true"), rank(), split))[0][0]
        assert cl.shape == plain.shape and cl.shape[1] == 3
        assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
        assert torch.equal(cl, plain)


def test_train_without_augmentation_uses_the_val_recipe(imagenet):
    loader = build(make_cfg(imagenet, "data.augment=false"), rank(), "train")
    ds, _ = build_dataset("imagenet", imagenet, "train", augment=False, image_size=S)
    for x, _, ids in one_pass(loader):
        ref = torch.stack([ds[i][0] for i in ids])
        assert (x - ref).abs().max() <= LEVEL + 1e-5


# --------------------------------------------------------------------------------------------- val


@pytest.mark.parametrize("world", [1, 2, 5, 30])
def test_val_counts_every_image_exactly_once(imagenet, world):
    cfg = make_cfg(imagenet)  # eval batch 8; with 30 ranks most ranks have one image, 9 have none
    labels = file_labels(imagenet, "val")
    ids, sizes = [], []
    for r in range(world):
        loader = build(cfg, rank(r, world), "val")
        batches = one_pass(loader)
        assert len(batches) == len(loader)
        for x, y, i in batches:
            assert x.shape[1:] == (3, S, S) and y.dtype == torch.int64 and y.ndim == 1
            assert y.tolist() == [labels[k] for k in i]
            sizes.append(len(y))
        ids += ids_of(batches)
        assert ids_of(batches) == list(range(r, len(labels), world))  # every world-th file, no padding
    assert sum(sizes) == len(ids) == len(labels) == 3 * N_VAL
    assert sorted(ids) == list(range(3 * N_VAL))
    if world == 2:
        assert sizes == [8, 3, 8, 2]  # 11 and 10 images: short last batches, not padded ones


def torch_val(root: str, size: int) -> torch.Tensor:
    ds, _ = build_dataset("imagenet", root, "val", augment=False, image_size=size)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def dali_val(root: str, size: int, batch: int = 8) -> torch.Tensor:
    loader = build(make_cfg(root, f"data.image_size={size}", f"data.eval_batch_size={batch}"), rank(), "val")
    batches = one_pass(loader)
    assert ids_of(batches) == list(range(loader.num_images))
    return torch.cat([x for x, _, _ in batches])


def variant(root: str, size: int, how: str) -> torch.Tensor:
    """Other ways to write the val recipe in DALI, to show what each costs in parity."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types

    files = dali.list_files("imagenet", root, "val")[0]
    R = round(size * 256 / 224)
    mean, std = [255 * m for m in tf.IMAGENET_MEAN], [255 * s for s in tf.IMAGENET_STD]

    @pipeline_def(batch_size=len(files), num_threads=2, device_id=None, seed=0)
    def pipe():
        jpegs, _ = fn.readers.file(files=files, random_shuffle=False)
        img = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        linear = dict(interp_type=types.INTERP_LINEAR, antialias=True)
        if how == "resize_shorter":
            img = fn.resize(img, resize_shorter=R, **linear)
        elif how == "not_smaller":
            img = fn.resize(img, size=[R, R], mode="not_smaller", **linear)
        else:  # torchvision's sizes, as the loader computes them
            filt = {"no_antialias": dict(interp_type=types.INTERP_LINEAR, antialias=False),
                    "cubic": dict(interp_type=types.INTERP_CUBIC, antialias=True)}.get(how, linear)
            hw = fn.peek_image_shape(jpegs)
            short = dmath.min(hw[0], hw[1])
            rh, rw = R * hw[0] // short, R * hw[1] // short
            img = fn.resize(img, resize_y=fn.cast(rh, dtype=types.FLOAT), resize_x=fn.cast(rw, dtype=types.FLOAT),
                            **filt)
            if how != "crop_pos":  # the loader's exact centre offset
                img = fn.slice(img, fn.stack(dali.center_offset(rh, size), dali.center_offset(rw, size)),
                               types.Constant([size, size], dtype=types.INT32), axis_names="HW")
                return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
        return fn.crop_mirror_normalize(img, crop=[size, size], crop_pos_x=0.5, crop_pos_y=0.5, dtype=types.FLOAT,
                                        output_layout="CHW", mean=mean, std=std)

    p = pipe()
    p.build()
    (out,) = p.run()
    return torch.stack([torch.from_numpy(np.array(out[i])) for i in range(len(files))])


def write_photos(root) -> str:
    """Crops of the two photographs scikit-learn ships, at typical ImageNet sizes, as JPEG (q 90)."""
    folder = os.path.join(root, "val", "n01")
    os.makedirs(folder)
    src = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    sizes = [(500, 375), (375, 500), (640, 427), (333, 500), (300, 256), (200, 180), (450, 449), (257, 600)]
    for k, name in enumerate(("china.jpg", "flower.jpg")):
        with Image.open(os.path.join(src, name)) as im:
            im = im.convert("RGB")
            for i, (w, h) in enumerate(sizes):
                box = (i * 7 % 40, i * 5 % 30, im.width - i * 3 % 20, im.height - i * 11 % 25)
                im.crop(box).resize((w, h), Image.LANCZOS).save(os.path.join(folder, f"{k}_{i}.JPEG"), quality=90)
    return str(root)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.mark.parametrize("which", ["small", "photos"])
def test_val_parity_with_the_torch_loader(imagenet, photos, which):
    """The loader's val tensors against torchvision Resize + CenterCrop on the same JPEGs.

    Measured on DALI 2.4 (mean |DALI - torch| in normalized units; small = 21 synthetic 33-120 px
    images at S=32, photos = 16 crops of 180-640 px of two photographs at S=224):
        the loader: torchvision sizes, half-to-even centre offset, linear+antialias  0.0027 / 0.0021
        DALI resize_shorter=R, crop_mirror_normalize crop_pos 0.5                0.1826 / 0.0527
        mode="not_smaller", size=R (the same sizes as resize_shorter)            0.1826 / 0.0527
        torchvision sizes, crop_pos 0.5 (so the offset rounding costs this)      0.1725 / 0.0397
        torchvision sizes + exact offset, linear, antialias=False                0.0417 / 0.0225
        torchvision sizes + exact offset, INTERP_CUBIC                           0.0195 / 0.0193
    (INTERP_TRIANGULAR, deprecated, measured once by hand: the same as linear+antialias.) The
    loader's worst pixel is one 0..255 level (0.0175).
    """
    root, size = (imagenet, S) if which == "small" else (photos, 224)
    ref = torch_val(root, size)
    got = dali_val(root, size)
    assert got.shape == ref.shape
    diff = (got - ref).abs()
    mad = diff.mean().item()
    print(f"\nval parity {which} S={size}: mean |diff| {mad:.5f}, max {diff.max().item():.4f}, "
          f"exact {(diff < 1e-4).float().mean().item():.3f}")
    assert diff.max() <= LEVEL + 1e-4
    assert mad < 0.004
    # what the usual DALI idioms give on the same images (the docstring's table)
    for how, at_least in (("resize_shorter", 10), ("not_smaller", 10), ("crop_pos", 10), ("no_antialias", 5),
                          ("cubic", 5)):
        other = (variant(root, size, how) - ref).abs().mean().item()
        print(f"  {how}: mean |diff| {other:.5f}")
        assert other > at_least * mad


# ---------------------------------------------------------------------------------- tiny_imagenet


WNIDS = ("n09", "n01", "n05")  # wnids.txt order (unsorted): labels follow the file, as the torch loader


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    train = {wnid: [picture(64, 64, seed=10 * c + i) for i in range(4)] for c, wnid in enumerate(WNIDS)}
    val = [(f"val_{i}.JPEG", WNIDS[(i * 2) % 3], picture(64, 64, seed=500 + i)) for i in range(9)]
    return write_tiny_imagenet(tmp_path_factory.mktemp("tiny"), WNIDS, train, val, quality=90)


def test_tiny_imagenet_val_equals_the_torch_loader(tiny):
    cfg = make_cfg(tiny, name="tiny_imagenet")
    assert dali.dali_info(cfg.data) == DatasetInfo(3, 3, 64, tf.IMAGENET_MEAN, tf.IMAGENET_STD)
    ds, _ = build_dataset("tiny_imagenet", tiny, "val", augment=False)
    batches = one_pass(build(cfg, rank(), "val"))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert ids_of(batches) == list(range(9)) and x.shape == (9, 3, 64, 64)
    assert y.tolist() == [ds[i][1] for i in range(9)] == [(i * 2) % 3 for i in range(9)]
    assert torch.allclose(x, torch.stack([ds[i][0] for i in range(9)]), atol=1e-5)  # no resampling at 64 px


def test_tiny_imagenet_train_is_the_torch_pad_crop_flip(tiny):
    """Each DALI train image is the torch loader's image shifted by (dy, dx) in [-8, 8] with zero fill,
    maybe mirrored, exactly: the same augmentation family, not a random-resized-crop."""
    cfg = make_cfg(tiny, name="tiny_imagenet")
    ds, _ = build_dataset("tiny_imagenet", tiny, "train", augment=False)
    p = tf.crop_pad(64)
    mean = torch.tensor(tf.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(tf.IMAGENET_STD).view(3, 1, 1)
    shifts = set()
    loader = build(cfg, rank(), "train")
    for _ in range(2):
        for x, y, ids in one_pass(loader):
            for img, label, i in zip(x, y, ids):
                ref, ref_label = ds[i]
                assert label == ref_label
                padded = torch.nn.functional.pad(ref * std + mean, (p, p, p, p))  # zero pixels, then normalize
                padded = (padded - mean) / std
                windows = {(dy, dx, flip): padded[:, dy:dy + 64, dx:dx + 64].flip(-1) if flip
                           else padded[:, dy:dy + 64, dx:dx + 64]
                           for dy in range(2 * p + 1) for dx in range(2 * p + 1) for flip in (0, 1)}
                found = [k for k, w in windows.items() if torch.allclose(w, img, atol=1e-4)]
                assert found, f"train image {i} is no shifted/flipped copy of the file"
                shifts.add(found[0])
    assert len(shifts) > 3  # offsets and flips vary


def test_tiny_imagenet_train_without_flip_and_crop_is_the_plain_image(tiny):
    """data.hflip=off data.crop_pad=0: DALI's train images are the files' images as the torch loader reads them."""
    cfg = make_cfg(tiny, "data.hflip=off", "data.crop_pad=0", name="tiny_imagenet")
    ds, _ = build_dataset("tiny_imagenet", tiny, "train", augment=False)
    n = 0
    for x, _, ids in one_pass(build(cfg, rank(), "train")):
        for img, i in zip(x, ids):
            assert torch.allclose(img, ds[i][0], atol=1e-4), i
            n += 1
    assert n == 12


# ------------------------------------------------------------------------------ info and errors


def test_info_only_and_errors(imagenet, tmp_path):
    cfg = make_cfg(imagenet)
    assert dali.dali_info(cfg.data) == DatasetInfo(3, 3, S, tf.IMAGENET_MEAN, tf.IMAGENET_STD)
    info_only = build(cfg, rank(), "train", info_only=True)
    assert len(info_only) == 6 and info_only.num_images == 24 and info_only.info.num_classes == 3
    with pytest.raises(RuntimeError, match="info_only"):
        iter(info_only)
    with pytest.raises(ValueError, match="batch_size"):
        build(make_cfg(imagenet, "data.batch_size=16"), rank(0, 2), "train")  # 32 > 24 images
    with pytest.raises(ValueError, match="data.loader=dali"):
        build(make_cfg(imagenet, "data.name=cifar10"), rank(), "val")
    with pytest.raises(FileNotFoundError, match="imagenet"):
        build(make_cfg(str(tmp_path / "missing")), rank(), "val")
    with pytest.raises(FileNotFoundError, match="imagenet"):
        dali.dali_info(make_cfg(str(tmp_path / "missing")).data)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_undecodable_jpeg_is_named_and_skip_is_refused_at_start(tmp_path, damage):
    """DALI names a cut JPEG itself but only a batch slot ("nvImageCodec failure: '#3'") for others: either
    way the error names the file. on_bad_image=skip cannot be honoured inside a DALI batch: refused."""
    from imnet.data.core import DataError

    root = write_imagenet(tmp_path / "im")
    bad = os.path.join(root, "train", "n02", "n02_3.JPEG")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 3] if damage == "truncated" else b"\xff\xd8\xff" + bytes(range(256)) * 8)
    loader = build(make_cfg(root), rank(0, 1), "train")
    loader.sampler.set_epoch(0, 0)
    with pytest.raises(DataError) as e:
        for _ in loader:
            pass
    assert str(e.value) == (f"{bad}: DALI cannot decode it (truncated); find every bad file with python -m "
                            "imnet.data.check ROOT, or train with data.loader=torch data.on_bad_image=skip")
    with pytest.raises(config.ConfigError, match="data.on_bad_image=skip: the DALI loader cannot replace an "
                                                 "unreadable image"):
        make_cfg(root, "data.on_bad_image=skip")
