"""WebDataset tar shards: which sample sits where, and reading only the samples a process needs.

A shard folder is a set of `*.tar` files in the WebDataset layout (each sample is the files that share
a key: `000123.jpg`, `000123.txt`; written by `webdataset.TarWriter`, img2dataset, or
`python -m ds_diffusers.data.write_shards`). The files are read with webdataset's own tar reader
(`group_by_keys`, over members read from a seekable `tarfile`, so skipped samples cost a header read);
this module decides the order.

The order of an epoch is a function of (seed, epoch, shard list, `shard_partitions`) and nothing else:
- shard i belongs to partition i % P, for good (so every partition's length is the same each epoch);
- each epoch, a partition reads its shards in an order drawn from (seed, epoch, partition), each
  shard's samples in stored order, up to the shortest partition's length L;
- global position g of the epoch is item g // P of partition g % P (P × L samples an epoch).
With W processes (W divides P), process r takes global positions r, r + W, r + 2W, ...: those all
lie in the partitions p with p % W == r, so each process opens only its own partitions' shards, one
at a time each. The order does not depend on W, so a run resumed on another process count continues
the same sequence of samples from the same global position.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import torch
from webdataset.tariterators import base_plus_ext, group_by_keys

from ds_diffusers.data.seeding import seeded_generator
from ds_diffusers.errors import ConfigError

# Rows of a shard shuffled among themselves each epoch (a reader holds at most this many samples of a shard).
SHUFFLE_BLOCK = 64
# Files webdataset's reader skips (`__key__`-style metadata); counted the same way here.
_META = re.compile(r"__[^/]*__($|/)")


def list_shards(dataset_dir: str) -> list[Path]:
    """The folder's `*.tar` files in name order; ConfigError when there is no such folder or no shard."""
    folder = Path(dataset_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError("dataset_dir", dataset_dir, "no such folder; with dataset_format: webdataset point it at a "
                          "folder of WebDataset .tar shards")
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise ConfigError("dataset_dir", dataset_dir, "holds no .tar shards; write WebDataset shards into it "
                          "(python -m ds_diffusers.data.write_shards) or set dataset_format: datasets")
    return shards


def _sample_members(archive: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str]]:
    """(member, its sample key) of every file webdataset's reader keeps, in stored order. The archive
    is opened seekable, so passing a member reads its header only and seeks past its data."""
    for member in archive:
        archive.members = []  # tarfile keeps every header it has read; a shard may hold millions
        if member.isreg() and not _META.match(member.name) and not member.name.startswith("__"):
            key, _ = base_plus_ext(member.name)
            if key is not None:
                yield member, key


def _sample_keys(path: Path) -> Iterator[str]:
    with tarfile.open(path, "r:") as archive:
        for _, key in _sample_members(archive):
            yield key


def count_samples(path: Path) -> int:
    """Samples in one shard: runs of members with the same key, as webdataset groups them."""
    count, previous = 0, None
    try:
        for key in _sample_keys(path):
            if key != previous:
                count, previous = count + 1, key
    except (tarfile.TarError, OSError) as err:
        raise ConfigError("dataset_dir", str(path), f"cannot read this shard as a tar file ({err}); "
                          "rewrite or remove it") from None
    return count


@lru_cache(maxsize=64)
def _block_permutation(seed: int, epoch: int, shard: int, block: int, size: int) -> tuple[int, ...]:
    return tuple(torch.randperm(size, generator=seeded_generator(seed, epoch, shard, block)).tolist())


@dataclass(frozen=True)
class ShardPlan:
    """Where every sample of every epoch is; see the module docstring."""

    shards: tuple[str, ...]
    counts: tuple[int, ...]
    partitions: int
    seed: int

    @property
    def order_key(self) -> str:
        """What the order depends on besides (seed, epoch), in words: a resume onto other shards says so."""
        listing = json.dumps([[Path(shard).name, count] for shard, count in zip(self.shards, self.counts)])
        digest = hashlib.blake2b(listing.encode(), digest_size=6).hexdigest()
        return f"{len(self.shards)} shards of {sum(self.counts)} samples (list {digest}) in {self.partitions} partitions"

    def partition_shards(self, partition: int) -> list[int]:
        return list(range(partition, len(self.shards), self.partitions))

    @cached_property
    def partition_length(self) -> int:
        """Samples each partition gives an epoch: the shortest partition's total."""
        return min(sum(self.counts[s] for s in self.partition_shards(p)) for p in range(self.partitions))

    @property
    def epoch_samples(self) -> int:
        return self.partitions * self.partition_length

    def shard_order(self, epoch: int, partition: int) -> list[int]:
        shards = self.partition_shards(partition)
        permutation = torch.randperm(len(shards), generator=seeded_generator(self.seed, epoch, partition)).tolist()
        return [shards[i] for i in permutation]

    def row_of(self, epoch: int, shard: int, index: int) -> int:
        """The stored row read as the shard's `index`-th sample this epoch: rows are shuffled within
        blocks of SHUFFLE_BLOCK consecutive rows, so a reader holds at most one block."""
        block = index // SHUFFLE_BLOCK
        size = min(SHUFFLE_BLOCK, self.counts[shard] - block * SHUFFLE_BLOCK)
        permutation = _block_permutation(self.seed, epoch, shard, block, size)
        return block * SHUFFLE_BLOCK + permutation[index % SHUFFLE_BLOCK]

    def locate(self, position: int) -> tuple[int, int]:
        """(partition, item in that partition) of global position `position`."""
        return position % self.partitions, position // self.partitions

    def check_world(self, world_size: int) -> None:
        if self.partitions % world_size:
            raise ConfigError("shard_partitions", self.partitions, f"must be a multiple of the {world_size} processes "
                              "(each process reads whole partitions); use a multiple of every process count you plan "
                              "to run with, e.g. 8 or 64")


def build_plan(dataset_dir: str, partitions: int, seed: int) -> ShardPlan:
    """The plan of a shard folder (one header scan per shard); ConfigError when the folder holds fewer
    shards than partitions or a partition would be empty."""
    shards = list_shards(dataset_dir)
    if len(shards) < partitions:
        raise ConfigError("shard_partitions", partitions, f"{dataset_dir} holds {len(shards)} shard(s), fewer than the "
                          f"partitions; use at most {len(shards)} or write the data into more shards")
    counts = tuple(count_samples(path) for path in shards)
    plan = ShardPlan(tuple(str(path) for path in shards), counts, partitions, seed)
    if plan.partition_length == 0:
        empty = next(shard for shard, count in zip(plan.shards, counts) if count == 0)
        raise ConfigError("dataset_dir", dataset_dir, f"a partition has no samples ({empty} holds none); remove empty "
                          "shards or lower shard_partitions")
    return plan


def _wanted_files(path: str, rows: set[int]) -> Iterator[dict[str, Any]]:
    """The files of the wanted rows of one shard as webdataset's reader yields them ({"fname", "data",
    "__url__"}); the other rows' data is seeked past, so a worker reads its own samples' bytes only."""
    with tarfile.open(path, "r:") as archive:
        row, previous, last = -1, None, max(rows)
        for member, key in _sample_members(archive):
            if key != previous:
                row, previous = row + 1, key
                if row > last:
                    return
            if row in rows:
                yield {"fname": member.name, "data": archive.extractfile(member).read(), "__url__": path}


def read_rows(path: str, rows: list[int]) -> Iterator[dict[str, Any]]:
    """The samples at `rows` (sorted) of one shard, in that order, grouped by webdataset's
    `group_by_keys` into `{"__key__", "__url__", ext: bytes}`."""
    found = 0
    for sample in group_by_keys(_wanted_files(path, set(rows))):
        found += 1
        yield sample
    if found != len(rows):
        raise ConfigError("dataset_dir", path, f"the shard holds fewer samples than at start-up (row {rows[found]} "
                          "is missing); shards must not change during a run")


def _read_in_order(path: str, rows: list[int]) -> Iterator[dict[str, Any]]:
    """The samples at `rows` (any order, each row in its shuffle block) of one shard, in that order:
    one pass through the file, holding at most the wanted rows of one block."""
    stored, held = iter(zip(sorted(rows), read_rows(path, sorted(rows)))), {}
    for row in rows:
        while row not in held:
            found, sample = next(stored)
            held[found] = sample
        yield held.pop(row)


def read_partition(plan: ShardPlan, epoch: int, partition: int, items: Iterable[int]) -> Iterator[dict[str, Any]]:
    """The samples at `items` (sorted positions within the partition's epoch order), in that order.
    Shards without a wanted item are not opened."""
    start, wanted = 0, iter(items)
    item = next(wanted, None)
    for shard in plan.shard_order(epoch, partition):
        end = start + plan.counts[shard]
        rows = []
        while item is not None and item < end:
            rows.append(plan.row_of(epoch, shard, item - start))
            item = next(wanted, None)
        if rows:
            yield from _read_in_order(plan.shards[shard], rows)
        if item is None:
            return
        start = end
