"""Data: datasets (imnet.data.datasets) behind one sharded, resumable loader.

    data = build(cfg.data, dist, seed=cfg.run.seed, channels_last=cfg.model.channels_last,
                 accum_steps=cfg.optim.accum_steps)

Every loader yields `(images, labels)` already on the device, in the memory format the model wants,
labels int64, so the training loop never knows which dataset it has.

Determinism: the train sampler (imnet.data.samplers) draws the permutation and one augmentation seed
per sample from a generator seeded with (seed, epoch). A sample's augmentation depends only on that
seed, never on which worker process made it, so a run resumed mid-epoch sees exactly the batches it
would have.

This module is the package's face: modules inside imnet.data import the leaf modules (core,
memory, samplers, transforms), never this one.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch.utils.data import DataLoader

from imnet.data.bad import BadImagePolicy
from imnet.data.core import DatasetInfo
from imnet.data.datasets import SyntheticDataset, build_dataset
from imnet.data.samplers import TrainSampler, ValSampler


class DeviceLoader:
    """Moves each batch to the device (and channels-last) as it leaves the DataLoader. On a GPU the
    copy of batch k+1 (from pinned memory, on a side stream) is started when batch k is handed out,
    so it overlaps step k; the consumer's stream waits for it only when it takes batch k+1."""

    def __init__(self, loader: DataLoader, device: torch.device, channels_last: bool):
        self.loader, self.device = loader, device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def _move(self, x, y, non_blocking: bool):
        x = x.to(self.device, non_blocking=non_blocking).contiguous(memory_format=self.memory_format)
        return x, y.to(self.device, dtype=torch.int64, non_blocking=non_blocking)

    def __iter__(self):
        if self.device.type != "cuda":
            for x, y in self.loader:
                yield self._move(x, y, False)
            return
        side = torch.cuda.Stream(self.device)
        batches = iter(self.loader)

        def start_next():
            batch = next(batches, None)
            if batch is None:
                return None
            with torch.cuda.stream(side):
                return self._move(*batch, True)

        ahead = start_next()
        while ahead is not None:
            torch.cuda.current_stream(self.device).wait_stream(side)
            for t in ahead:  # made on the side stream, used on the consumer's: keep the memory until then
                t.record_stream(torch.cuda.current_stream(self.device))
            batch, ahead = ahead, start_next()
            yield batch


@dataclass
class Data:
    train: Optional[Iterable]  # DeviceLoader | ResidentLoader | DaliLoader: (images, labels) on the device
    val: Iterable
    info: DatasetInfo
    steps_per_epoch: int   # optimizer steps (micro-batches // accum_steps)
    n_val: int


def _loader(ds, sampler, batch, d, device, drop_last) -> DataLoader:
    workers = d.workers
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def build(d, dist, *, seed: int, channels_last: bool, accum_steps: int = 1, train: bool = True) -> Data:
    """Train and val loaders of the data section `d` (cfg.data) on this rank.

    seed: run.seed (sample order, augmentation, synthetic images). channels_last: model.channels_last,
    the memory format batches arrive in. accum_steps: optim.accum_steps, micro-batches per optimizer
    step (for steps_per_epoch). train=False builds the val loader only.
    """
    if d.loader == "dali":
        return _build_dali(d, dist, seed, channels_last, accum_steps, train)
    kw = dict(image_size=d.image_size, synthetic_classes=d.synthetic_classes,
              synthetic_channels=d.synthetic_channels, seed=seed, hflip=d.hflip, crop_pad=d.crop_pad)
    val_ds, info = build_dataset(d.name, d.root, "val", augment=False, synthetic_size=max(1, d.synthetic_size // 4),
                                 **kw)
    train_ds = None
    if train:
        train_ds, _ = build_dataset(d.name, d.root, "train", augment=d.augment, synthetic_size=d.synthetic_size, **kw)
        if hasattr(train_ds, "path"):  # a dataset of files: an unreadable one gets data.on_bad_image
            # skip replaces it in the same batch slot, so every rank keeps its step count; val always
            # uses "error": a replaced val image would count its neighbour twice.
            log = functools.partial(print, f"[rank {dist.rank}]", file=sys.stderr, flush=True)
            train_ds = BadImagePolicy(train_ds, d.on_bad_image, log=log)
            val_ds = BadImagePolicy(val_ds, "error")
    val_batch = d.eval_batch_size or 2 * d.batch_size
    cl = channels_last
    val_sampler = ValSampler(len(val_ds), dist.rank, dist.world)
    sampler = TrainSampler(len(train_ds), dist.rank, dist.world, d.batch_size, seed) if train else None

    if d.loader == "gpu":
        from imnet.data.resident import ResidentLoader

        if isinstance(val_ds, SyntheticDataset):  # made in memory, as uint8 (its to_uint8 says how)
            val_ds, train_ds = val_ds.to_uint8(), train_ds.to_uint8() if train else None
        val = ResidentLoader(val_ds, val_sampler, val_batch, dist.device, cl, train=False)
        tr = ResidentLoader(train_ds, sampler, d.batch_size, dist.device, cl, train=True) if train else None
    else:
        val = DeviceLoader(_loader(val_ds, val_sampler, val_batch, d, dist.device, False), dist.device, cl)
        tr = (DeviceLoader(_loader(train_ds, sampler, d.batch_size, d, dist.device, True), dist.device, cl)
              if train else None)
    return Data(tr, val, info, _steps(sampler, accum_steps), len(val_ds))


def _steps(sampler: Optional[TrainSampler], accum_steps: int) -> int:
    """Optimizer steps per epoch (0 without a train loader)."""
    if sampler is None:
        return 0
    steps = sampler.batches // accum_steps
    if steps == 0:
        raise ValueError(f"optim.accum_steps: {accum_steps} micro-batches is more than an epoch "
                         f"({sampler.batches} per rank)")
    return steps


def _build_dali(d, dist, seed: int, channels_last: bool, accum_steps: int, train: bool) -> Data:
    from imnet.data import dali  # DALI itself is imported only when a pipeline is built

    val = dali.build(d, dist, "val", seed=seed, channels_last=channels_last)
    tr = dali.build(d, dist, "train", seed=seed, channels_last=channels_last) if train else None
    return Data(tr, val, val.info, _steps(tr.sampler if tr is not None else None, accum_steps), val.num_images)
