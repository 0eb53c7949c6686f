"""The device-resident loader (`data.loader=gpu`) for datasets that fit in device memory.

The uint8 images (N, C, H, W) and labels are copied to the device once. Each batch is then a
few whole-batch ops: gather the samples, mirror the ones to flip, zero-pad, take every crop as one
row gather, normalize as one multiply and one add, all on the device, with no Python per sample and no
worker processes. That is what makes 1-2 images per GPU (the GroupNorm micro-batch regime)
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
    """On the CPU, build a batch on one thread: the ops are small, and intra-op threads wait for each
    other at every op, which on a busy machine costs more than the ops. A no-op on the GPU."""
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
        self._starts = None

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch if self.train else -(-n // self.batch)

    def _indices(self):
        if self.train:
            idx, seeds = self.sampler.epoch_indices()
            return idx.to(self.device), seeds.to(self.device)
        return torch.as_tensor(self.sampler.indices, dtype=torch.int64, device=self.device), None

    def _augment_plan(self, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, once per epoch: the flip bit (0/1) and the offset of the crop's first byte in
        its zero-padded plane, top * padded_width + left. A flipped sample is read from the mirrored
        plane, where the same crop starts at column 2p - left."""
        p, k = self.pad, 2 * self.pad + 1
        top, left = seeds % k, (seeds // k) % k
        flip = (seeds // (k * k)) % 2 if self.flip else torch.zeros_like(seeds)
        left = torch.where(flip == 1, 2 * p - left, left)
        return flip, top * (self.images.shape[-1] + 2 * p) + left

    def _augment(self, x: torch.Tensor, flip: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W): random crop of the zero-padded image + flip. The padded batch is
        viewed as overlapping rows of W bytes (a row may start at any byte), so the crop is ONE
        index_select of B*C*H rows (cheaper than a gather of every byte, whose index would be built per
        batch); the flip picks each sample from the batch or its mirror first."""
        b, c, h, w = x.shape
        p = self.pad
        if self.flip:
            pick = torch.arange(b, device=x.device) + b * flip
            x = torch.cat([x, x.flip(3)]).index_select(0, pick)
        flat = F.pad(x, (p, p, p, p)).view(-1)
        rows = flat.as_strided((flat.numel() - w + 1, w), (1, 1))
        starts = self._row_starts(b, c, h, w) + offset.view(b, 1, 1)
        return rows.index_select(0, starts.view(-1)).view(b, c, h, w)

    def _row_starts(self, b: int, c: int, h: int, w: int) -> torch.Tensor:
        """(B, C, H) offsets of each output row's first byte in the padded batch, at crop (0, 0)."""
        if self._starts is None or self._starts.shape[0] != b:
            hp, wp = h + 2 * self.pad, w + 2 * self.pad
            planes = torch.arange(b * c, device=self.device).view(b, c, 1) * (hp * wp)
            self._starts = planes + torch.arange(h, device=self.device) * wp
        return self._starts

    def __iter__(self):
        idx, seeds = self._indices()
        n = len(idx) // self.batch * self.batch if self.train else len(idx)
        plan = self._augment_plan(seeds) if self.augment else None
        for start in range(0, n, self.batch):
            part = slice(start, start + self.batch)
            with _one_thread(self.device):
                batch = self._batch(idx[part], None if plan is None else (plan[0][part], plan[1][part]))
            yield batch

    def _batch(self, i: torch.Tensor, plan):
        x = self.images.index_select(0, i)
        if plan is not None:
            x = self._augment(x, *plan)
        # (x / 255 - mean) / std as one multiply-add per element, written in the model's layout
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=self.memory_format)
        out.copy_(x).mul_(self.scale).add_(self.shift)
        return out, self.targets.index_select(0, i)
