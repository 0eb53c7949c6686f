"""Which samples each rank reads, in which order, with which augmentation seed.

TrainSampler draws the permutation and one augmentation seed per sample from a generator seeded
with (seed, epoch), so a run resumed mid-epoch sees exactly the batches it would have; every loader
(torch, device-resident, DALI) takes its train order from it. ValSampler splits the val set so the
ranks together read every image exactly once.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class TrainSampler(Sampler):
    """Shuffled, sharded, equal-length per rank, resumable at any batch.

    Each epoch the global permutation is cut to a multiple of world * batch (the tail changes every
    epoch, so no image is dropped for good), and rank r takes every world-th index from r on. Yields
    `(index, sample_seed)` pairs.
    """

    def __init__(self, n: int, rank: int, world: int, batch: int, seed: int):
        self.n, self.rank, self.world, self.batch, self.seed = n, rank, world, batch, seed
        self.batches = n // (world * batch)  # per rank, per epoch
        if self.batches == 0:
            raise ValueError(f"data.batch_size: {batch} x {world} ranks is more than the {n} training images")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches - self.start) * self.batch

    def epoch_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (indices, augmentation seeds) for the rest of the epoch, as int64 tensors."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        used = self.batches * self.batch * self.world
        mine = torch.arange(self.rank, used, self.world)[self.start * self.batch:]
        return perm[mine], seeds[mine]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx, seeds = self.epoch_indices()
        return iter(zip(idx.tolist(), seeds.tolist()))


class ValSampler(Sampler):
    """Rank r gets indices r, r+world, ...: every image exactly once over all ranks, no padding."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
