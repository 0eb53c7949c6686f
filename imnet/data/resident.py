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

import torch
import torch.nn.functional as F


class ResidentLoader:
    def __init__(self, ds, sampler, batch: int, device: torch.device, channels_last: bool, train: bool):
        if not hasattr(ds, "images"):
            raise ValueError("data.loader=gpu needs a dataset held in memory as uint8 tensors "
                             f"({type(ds).__name__} is not); use data.loader=torch")
        self.sampler, self.batch, self.device, self.train = sampler, batch, device, train
        self.images = ds.images.to(device)                        # uint8 (N, C, H, W), once
        self.targets = ds.targets.to(device=device, dtype=torch.int64)
        c = self.images.shape[1]
        self.mean = torch.tensor(ds.mean, device=device, dtype=torch.float32).view(1, 1, 1, c)
        self.std = torch.tensor(ds.std, device=device, dtype=torch.float32).view(1, 1, 1, c)
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
        """uint8 (B, C, H, W) -> uint8 (B, H, W, C): random crop of the zero-padded image + flip."""
        b, _, h, w = x.shape
        p, k = self.pad, 2 * self.pad + 1
        top, left, flip = seeds % k, (seeds // k) % k, (seeds // (k * k)) % 2 == 1
        xp = F.pad(x, (p, p, p, p)).permute(0, 2, 3, 1)           # (B, H+2p, W+2p, C), a view
        rows = top[:, None] + torch.arange(h, device=x.device)    # (B, H)
        cols = torch.arange(w, device=x.device).expand(b, w)
        if self.flip:
            cols = torch.where(flip[:, None], w - 1 - cols, cols)
        cols = left[:, None] + cols                               # (B, W)
        return xp[torch.arange(b, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]

    def __iter__(self):
        idx, seeds = self._indices()
        n = len(idx) // self.batch * self.batch if self.train else len(idx)
        for start in range(0, n, self.batch):
            i = idx[start:start + self.batch]
            x = self.images[i]
            if self.augment:
                hwc = self._augment(x, seeds[start:start + self.batch])
            else:
                hwc = x.permute(0, 2, 3, 1)
            out = hwc.float().div_(255).sub_(self.mean).div_(self.std).permute(0, 3, 1, 2)  # NCHW view
            yield out.contiguous(memory_format=self.memory_format), self.targets[i]
