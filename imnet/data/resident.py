"""The device-resident loader (`data.loader=gpu`) for datasets that fit in device memory.

The uint8 images (N, C, H, W) and labels are copied to the device once. Each batch is then a
gather: the random crop from the zero-padded image and the horizontal flip are one advanced index
into the padded batch, followed by the normalization, all on the device, with no Python per sample
and no worker processes. That is what makes 1-2 images per GPU (the GroupNorm micro-batch regime)
fast enough to study. On the CPU the same code runs on the CPU.

Sharding, epoch order and resume come from the same TrainSampler as the torch loader: the same
samples on the same rank at the same step. The crop offsets and flips are derived from each
sample's 62-bit augmentation seed by arithmetic on the device (top = s mod (2p+1), left = the next
digit in base 2p+1, flip = the next bit), so they are deterministic and resume exactly, but they
are not the same draws as the torch loader's (that one feeds the seed to a torch.Generator).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """On the CPU, build a batch on one thread: the ops are small (about 1 MB for 64 CIFAR images),
    and with intra-op threads on a busy 2-core machine a batch took 15-20 ms instead of 1 ms
    (threads wait for each other at every op). A no-op on the GPU."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ResidentLoader:
    def __init__(self, ds, sampler, batch: int, device: torch.device, channels_last: bool, train: bool):
        if not hasattr(ds, "images"):
            raise ValueError("data.loader=gpu needs a dataset held in memory as uint8 tensors "
                             f"({type(ds).__name__} is not); use data.loader=torch")
        self.sampler, self.batch, self.device, self.train = sampler, batch, device, train
        self.images = ds.images.to(device)                        # uint8 (N, C, H, W), once
        self.targets = ds.targets.to(device=device, dtype=torch.int64)
        mean = torch.tensor(ds.mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(ds.std, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale, self.shift = 1 / (255 * std), -mean / std
        self.augment = train and ds.augment
        self.pad, self.flip = ds.pad, ds.flip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch if self.train else -(-n // self.batch)

    def _indices(self):
        if self.train:
            idx, seeds = self.sampler.epoch_indices()
            return idx.to(self.device), seeds.to(self.device)
        return torch.as_tensor(self.sampler.indices, dtype=torch.int64, device=self.device), None

    def _augment(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W): random crop of the zero-padded image + flip, as ONE index_select of
        bytes from the flattened padded batch (on 2 CPU threads: 0.8 ms for 64 CIFAR images; two
        torch.gather passes took 1.3 ms and 3-tensor advanced indexing far more)."""
        b, c, h, w = x.shape
        p, k = self.pad, 2 * self.pad + 1
        hp, wp = h + 2 * p, w + 2 * p
        top, left, flip = seeds % k, (seeds // k) % k, (seeds // (k * k)) % 2 == 1
        flat = F.pad(x, (p, p, p, p)).view(-1)
        cols = torch.arange(w, device=x.device).expand(b, w)
        if self.flip:
            cols = torch.where(flip[:, None], w - 1 - cols, cols)
        cols = cols + left[:, None]                                                            # (B, W)
        planes = torch.arange(b * c, device=x.device).view(b, c, 1) * hp                        # (B, C, 1)
        rows = (planes + top.view(b, 1, 1) + torch.arange(h, device=x.device)) * wp            # (B, C, H)
        return flat.index_select(0, (rows[..., None] + cols[:, None, None, :]).view(-1)).view(b, c, h, w)

    def __iter__(self):
        idx, seeds = self._indices()
        n = len(idx) // self.batch * self.batch if self.train else len(idx)
        for start in range(0, n, self.batch):
            part = slice(start, start + self.batch)
            with _one_thread(self.device):
                batch = self._batch(idx[part], seeds[part] if self.augment else None)
            yield batch

    def _batch(self, i: torch.Tensor, seeds):
        x = self.images.index_select(0, i)
        if seeds is not None:
            x = self._augment(x, seeds)
        # (x / 255 - mean) / std as one multiply-add per element, broadcast over contiguous planes
        out = x.float().mul_(self.scale).add_(self.shift)
        return out.contiguous(memory_format=self.memory_format), self.targets.index_select(0, i)
