"""Samplers: a seeded per-epoch shuffle split across ranks that can resume mid-epoch, and an eval shard."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler", "ShardSampler"]


class EpochSampler(Sampler[int]):
    """Each epoch: a permutation of the dataset drawn from (seed, epoch), cut to whole global
    batches, and this rank's contiguous share of every batch.

    ``set_epoch(epoch, skip_batches)`` starts the epoch after ``skip_batches`` batches, so
    that a resumed run sees exactly the samples an uninterrupted one would.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of ranks {world_size}")
        if size < batch_size:
            raise ValueError(f"the dataset has {size} items, fewer than one batch of {batch_size}")
        self.size, self.batch_size, self.rank, self.world_size, self.seed = size, batch_size, rank, world_size, seed
        self.per_rank = batch_size // world_size
        self.epoch, self.skip = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.batch_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(f"skip_batches must be in [0, {self.batches_per_epoch}], got {skip_batches}")
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip) * self.per_rank

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.batches_per_epoch * self.batch_size]
        batches = order.view(self.batches_per_epoch, self.world_size, self.per_rank)  # (steps, ranks, per-rank)
        return iter(batches[self.skip :, self.rank].flatten().tolist())


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: the ranks together see each item exactly once."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, size, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
