"""Per-rank sharding of a per-epoch permutation, with an exact mid-epoch start for resume.

The contract every sampler of this project keeps (ShardedEpochSampler here, the bucket sampler in
`buckets`), so that a run resumes on any number of processes:
- an epoch's order is one global sequence of sample indices, a pure function of (seed, epoch)
  (and of the dataset), never of the rank or the world size;
- the data position is the cursor: how many samples of that sequence are consumed, over all ranks
  (`TrainState.samples_in_epoch`); `set_start(cursor)` after `set_epoch`;
- from the cursor on, the remaining positions are striped over the ranks: rank r of W takes
  positions cursor + r, cursor + r + W, ... (the tail that does not fill a row of W is dropped, as
  at the end of every epoch).
Saved after whole optimizer steps, the cursor is a multiple of the global batch, so on the same
world size this is exactly the shard a run that never stopped reads; on another world size the
positions before the cursor are the ones trained on, and those after it are each read once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ds_diffusers.data.seeding import seeded_generator


def shard_length(dataset_len: int, world_size: int, drop_last: bool = True) -> int:
    """Samples each rank sees per epoch: the tail is dropped (or padded) so shards are equal."""
    return dataset_len // world_size if drop_last else math.ceil(dataset_len / world_size)


class ShardedEpochSampler(Sampler[int]):
    """Yields this rank's indices for one epoch; deterministic in (seed, epoch, rank, world_size).

    Each epoch draws a permutation of range(dataset_len) from a generator seeded with
    (seed, epoch), truncates it to a multiple of world_size (or pads it by wrapping around
    when drop_last=False) and gives rank r the slice [start + r::world_size] of it, so ranks hold
    disjoint, equal-length shards. `set_epoch` resets the start, so call `set_start` after it.
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int, seed: int,
                 drop_last: bool = True, shuffle: bool = True) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.dataset_len = dataset_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.num_samples = shard_length(dataset_len, world_size, drop_last)
        if self.num_samples == 0:
            raise ValueError(f"{dataset_len} samples cannot give each of {world_size} ranks one sample")
        self.total_size = self.num_samples * world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def set_start(self, num_consumed: int) -> None:
        """Skip the first `num_consumed` positions of the epoch's global order, which the ranks of
        this or an earlier run (of any world size) already trained on."""
        if num_consumed < 0:
            raise ValueError(f"start {num_consumed} is negative")
        self.start = min(num_consumed, self.total_size)

    def epoch_indices(self) -> list[int]:
        """The whole (truncated or padded) permutation of this epoch, before sharding."""
        if self.shuffle:
            order = torch.randperm(self.dataset_len, generator=seeded_generator(self.seed, self.epoch)).tolist()
        else:
            order = list(range(self.dataset_len))
        if self.total_size > len(order):
            order = (order * math.ceil(self.total_size / len(order)))[: self.total_size]
        return order[: self.total_size]

    def shard_indices(self) -> list[int]:
        """This rank's whole shard of the current epoch, ignoring the start."""
        return self.epoch_indices()[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        remaining = self.epoch_indices()[self.start : self.start + len(self) * self.world_size]
        return iter(remaining[self.rank :: self.world_size])

    def __len__(self) -> int:
        return (self.total_size - self.start) // self.world_size
