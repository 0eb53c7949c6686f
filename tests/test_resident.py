"""The device-resident loader (data.loader=gpu), on the CPU: same samples as the torch loader,
correct crops and flips, deterministic, resumable."""

import pytest
import torch
import torch.nn.functional as F

from imnet import config, dist
from imnet import data as D
from imnet.data.memory import TensorImageDataset
from imnet.data.resident import ResidentLoader
from imnet.data.samplers import TrainSampler, ValSampler

CPU = torch.device("cpu")


def dataset(n=40, c=3, size=8, flip=True, width=None):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, size, width or size), dtype=torch.uint8, generator=g)
    return TensorImageDataset(images, torch.arange(n) % 5, (0.5,) * c, (0.25,) * c, augment=True, flip=flip)


@pytest.mark.parametrize("width, channels_last", [(8, False), (8, True), (6, True)])
def test_crop_and_flip_follow_the_sample_seed(width, channels_last):
    ds = dataset(width=width)
    sampler = TrainSampler(len(ds), 0, 1, 8, seed=3)
    loader = ResidentLoader(ds, sampler, 8, CPU, channels_last=channels_last, train=True)
    idx, seeds = sampler.epoch_indices()
    x, y = next(iter(loader))
    p, k = ds.pad, 2 * ds.pad + 1
    assert p == 1
    flips = 0
    for j in range(8):
        s = seeds[j].item()
        top, left, flip = s % k, (s // k) % k, (s // (k * k)) % 2
        img = F.pad(ds.images[idx[j]], (p, p, p, p))[:, top:top + 8, left:left + width]
        if flip:
            img = img.flip(-1)
            flips += 1
        expect = (img.float() / 255 - 0.5) / 0.25
        assert torch.allclose(x[j], expect, atol=1e-6), j
        assert y[j].item() == ds.targets[idx[j]].item()
    assert 0 < flips < 8  # both cases occur in this batch
    assert x.shape == (8, 3, 8, width)
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_no_flip_for_digit_like_sets():
    ds = dataset(flip=False)
    sampler = TrainSampler(len(ds), 0, 1, 40, seed=1)
    x, _ = next(iter(ResidentLoader(ds, sampler, 40, CPU, False, True)))
    idx, seeds = sampler.epoch_indices()
    p, k = ds.pad, 2 * ds.pad + 1
    for j in range(40):
        s = seeds[j].item()
        img = F.pad(ds.images[idx[j]], (p, p, p, p))[:, s % k:s % k + 8, (s // k) % k:(s // k) % k + 8]
        assert torch.allclose(x[j], (img.float() / 255 - 0.5) / 0.25, atol=1e-6)


def test_shards_resume_and_determinism():
    ds = dataset()
    full = []
    for rank in range(2):
        s = TrainSampler(len(ds), rank, 2, 4, seed=7)
        s.set_epoch(2)
        batches = list(ResidentLoader(ds, s, 4, CPU, False, True))
        assert len(batches) == 5 and all(x.shape == (4, 3, 8, 8) for x, _ in batches)
        again = list(ResidentLoader(ds, s, 4, CPU, False, True))
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
        s.set_epoch(2, start_batch=3)  # resume after 3 batches: the same last 2 batches
        tail = list(ResidentLoader(ds, s, 4, CPU, False, True))
        assert len(tail) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(batches[3:], tail))
        full.append(s.epoch_indices()[0])
    s0 = TrainSampler(len(ds), 0, 2, 4, seed=7)
    s0.set_epoch(2)
    s1 = TrainSampler(len(ds), 1, 2, 4, seed=7)
    s1.set_epoch(2)
    a, b = set(s0.epoch_indices()[0].tolist()), set(s1.epoch_indices()[0].tolist())
    assert not a & b and len(a | b) == 40


def test_val_equals_the_torch_loader_and_counts_once():
    cfg_t = config.load(None, ["data.name=digits", "data.eval_batch_size=50"])
    cfg_g = config.load(None, ["data.name=digits", "data.eval_batch_size=50", "data.loader=gpu",
                               "model.channels_last=true"])
    d = dist.setup(cfg_t.dist)
    t, g = (D.build(c.data, d, seed=c.run.seed, channels_last=c.model.channels_last) for c in (cfg_t, cfg_g))
    vt, vg = list(t.val), list(g.val)
    assert sum(len(y) for _, y in vg) == 360 and len(vg) == len(g.val) == 8
    for (xa, ya), (xb, yb) in zip(vt, vg):
        assert torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-6)
        assert xb.is_contiguous(memory_format=torch.channels_last)
    # the train loaders walk the same samples in the same order
    t.train.sampler.set_epoch(1)
    g.train.sampler.set_epoch(1)
    for (_, ya), (_, yb) in zip(t.train, g.train):
        assert torch.equal(ya, yb)


def test_val_shards_every_image_once():
    ds = dataset(n=23)
    ds.augment = False
    seen = []
    for rank in range(3):
        for _, y in ResidentLoader(ds, ValSampler(23, rank, 3), 4, CPU, False, train=False):
            seen.append(len(y))
    assert sum(seen) == 23


def test_refuses_datasets_not_in_memory():
    class Lazy(torch.utils.data.Dataset):
        pass

    with pytest.raises(ValueError, match="data.loader=gpu needs a dataset held in memory"):
        ResidentLoader(Lazy(), None, 4, CPU, False, True)


def test_synthetic_data_goes_resident_as_uint8_within_a_32nd():
    """data.name=synthetic with data.loader=gpu: the set quantized to uint8 in memory; its val batches
    are the synthetic images to within 1/32 (none is beyond the clip at -8 and 7.94 here), same labels."""
    cfg = config.load(None, ["data.name=synthetic", "data.synthetic_size=64", "data.image_size=8",
                             "data.loader=gpu", "data.batch_size=4"])
    d = dist.setup(cfg.dist)
    resident = D.build(cfg.data, d, seed=0, channels_last=False)
    plain = D.build(cfg.data.model_copy(update={"loader": "torch"}), d, seed=0, channels_last=False)
    n = 0
    for (x, y), (x0, y0) in zip(resident.val, plain.val):
        assert torch.equal(y, y0)
        assert x0.abs().max().item() < 7.9 and (x - x0).abs().max().item() <= 1 / 32 + 1e-6
        n += len(y)
    assert n == 16 and resident.steps_per_epoch == plain.steps_per_epoch == 16
    x, y = next(iter(resident.train))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32


def test_device_loader_yields_the_dataloaders_batches_in_order():
    """DeviceLoader (the torch DataLoader path) hands out exactly the DataLoader's batches, in order,
    channels-last with int64 labels; on a GPU the same, each copied one batch ahead."""
    from torch.utils.data import DataLoader

    ds = dataset(n=24)
    sampler = TrainSampler(len(ds), 0, 1, 8, seed=3)
    plain = DataLoader(ds, batch_size=8, sampler=sampler)
    want = list(plain)
    got = list(D.DeviceLoader(plain, CPU, channels_last=True))
    assert len(got) == len(want) == 3
    for (x, y), (wx, wy) in zip(got, want):
        assert torch.equal(x, wx) and torch.equal(y, wy) and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
