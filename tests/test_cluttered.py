"""python -m imnet.data.cluttered: the harder digits set, written in the fast HDF5 layout that
`data.name=h5` reads, the same pixels on every run."""

import h5py
import numpy as np
import torch

from imnet.data import cluttered, h5
from imnet.data.datasets import build_dataset


def test_writes_the_digits_labels_in_the_fast_layout_the_same_every_time(tmp_path):
    assert cluttered.main(["--out", str(tmp_path / "a")]) == 0
    assert cluttered.main(["--out", str(tmp_path / "b")]) == 0
    assert cluttered.main(["--out", str(tmp_path / "c"), "--seed", "5"]) == 0
    for split, n in (("train", 1437), ("val", 360)):
        digits, _ = build_dataset("digits", "", split, augment=False)
        with h5py.File(tmp_path / "a" / f"{split}.h5") as f, h5py.File(tmp_path / "b" / f"{split}.h5") as g, \
                h5py.File(tmp_path / "c" / f"{split}.h5") as other:
            images = f["images"][:]
            assert images.shape == (n, 32, 32, 1) and images.dtype == np.uint8
            assert np.array_equal(images, g["images"][:])             # same seed: same pixels
            assert not np.array_equal(images, other["images"][:])    # another seed: others
            assert np.array_equal(f["labels"][:], digits.targets.numpy())
            assert f.attrs["num_classes"] == 10 and not f.attrs["hflip"]
            train = h5py.File(tmp_path / "a" / "train.h5")["images"][:]
            mean, std = h5.stats(train)
            assert np.allclose(f.attrs["mean"], mean) and np.allclose(f.attrs["std"], std)
    ds, info = build_dataset("h5", str(tmp_path / "a"), "train", augment=True)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 32) and len(ds) == 1437
    assert ds[0][0].shape == (1, 32, 32)


def test_each_image_has_its_own_contrast_and_background():
    """What makes the set hard for a batch of 2: per-image statistics vary far more than in digits."""
    digits, _ = build_dataset("digits", "", "train", augment=False, image_size=8)
    src = digits.images[:200, 0].numpy()
    made = cluttered.make(src, seed=0).astype(np.float64)
    plain = torch.nn.functional.interpolate(digits.images[:200].float(), size=32, mode="bilinear").numpy()
    spread = lambda x: np.std(x.reshape(len(x), -1).mean(1)) / np.mean(x)  # noqa: E731
    assert spread(made) > 2 * spread(plain)
    assert made.reshape(200, -1).min(1).max() > 40  # some backgrounds are lit
