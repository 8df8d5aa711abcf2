"""Aspect-ratio buckets (`aspect_ratio_buckets`): train each image at the shape of nearest aspect ratio
at a target pixel area, instead of a square crop.

- The table: for each target side s in `bucket_resolutions` (area s²), every width that is a multiple
  of `bucket_step` with the height that brings the area nearest s² (also a multiple of the step), and
  the same shapes turned portrait, aspect ratios up to `MAX_ASPECT_RATIO` either way. The step is the
  VAE's factor × the denoiser's own downsampling (a UNet's down blocks, a transformer's patch), so
  every latent divides evenly.
- Assignment needs only each image's size, read from its header once (`read_image_sizes`, on rank 0
  in data/prepare.py, kept in `cache_dir` for the next start): an image goes to the largest listed
  area it covers without upscaling (the smallest when it covers none), and there to the bucket of
  nearest aspect ratio (in log ratio, which is the bucket that crops least). It is resized to cover
  the bucket and cropped by what the two aspect ratios differ.
- Tiny buckets: a bucket with fewer images than one global batch (micro batch × ranks) is merged into
  its nearest bucket (aspect ratio and area), smallest first, until every bucket fills a global batch.
  Its images then crop more than rounding needs; the merges are logged. (SimpleTuner drops such
  buckets' images, "bucket pruning"; merging keeps every image.)
- The schedule (`BucketBatchSampler`): per epoch a sequence of global batches, each from one bucket,
  a pure function of (seed, epoch, global batch size): each bucket's rows are permuted, its last
  partial global batch is filled with rows of the same bucket drawn again (every image trains at
  least once per epoch and no batch holds one image twice), and the batches of all buckets are
  shuffled together. Rank r takes the slice [r·m, (r+1)·m) of each, so all ranks run the same shape at
  the same step (ZeRO never waits on a rank with another shape). The resume cursor is the number
  of global samples consumed in the epoch, as without buckets.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Sampler

from ds_diffusers.config.schema import Config
from ds_diffusers.data.decode import _DECODE_ERRORS, _bad_image_error, undecoded
from ds_diffusers.data.seeding import seeded_generator
from ds_diffusers.errors import ConfigError

# Aspect ratios beyond 4:1 share the 4:1 bucket (kohya's defaults, 256..1024 at 512², reach 4:1 too).
MAX_ASPECT_RATIO = 4.0
# Rows read per batch while reading image headers.
HEADER_ROWS = 1024
# Salt of the schedule's generator, so it shares no stream with (seed, epoch, row) of the samples.
SCHEDULE_STREAM = -1


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int

    @property
    def log_aspect(self) -> float:
        return math.log(self.width / self.height)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def bucket_table(sides: Sequence[int], step: int) -> dict[int, list[Bucket]]:
    """Per target side, its buckets sorted by aspect ratio (tallest first)."""
    table = {}
    for side in sorted(set(sides)):
        area, buckets = side * side, set()
        for width in range(step, int(math.sqrt(area * MAX_ASPECT_RATIO)) + step + 1, step):
            height = max(step, round(area / width / step) * step)
            if max(width / height, height / width) <= MAX_ASPECT_RATIO:
                buckets.update({Bucket(height, width), Bucket(width, height)})  # portrait and landscape alike
        table[side] = sorted(buckets, key=lambda bucket: bucket.log_aspect)
    return table


def nearest_bucket(height: int, width: int, table: dict[int, list[Bucket]]) -> Bucket:
    """The bucket an image of this size trains at: the largest area it covers (else the smallest),
    there the nearest aspect ratio (the first of two equally near)."""
    covered = [side for side in table if side * side <= height * width]
    side = max(covered) if covered else min(table)
    aspect = math.log(width / height)
    return min(table[side], key=lambda bucket: abs(bucket.log_aspect - aspect))


def crop_fraction(height: int, width: int, bucket: Bucket) -> float:
    """The fraction of the resized (covering) image that a crop to `bucket` removes."""
    return 1.0 - math.exp(-abs(math.log(width / height) - bucket.log_aspect))


@dataclass
class BucketPlan:
    """Every row's bucket after merging tiny ones. `sizes` is each row's (height, width) from its
    header ((-1, -1) when unreadable: such rows are left out of the schedule)."""

    buckets: list[Bucket]
    bucket_of_row: np.ndarray  # int32 [rows], an index into `buckets`, -1 = left out
    sizes: np.ndarray  # int32 [rows, 2]
    merges: list[str]

    def size_of(self, row: int) -> tuple[int, int]:
        bucket = self.buckets[int(self.bucket_of_row[row])]
        return bucket.height, bucket.width

    def original_size(self, row: int) -> tuple[int, int] | None:
        height, width = (int(v) for v in self.sizes[row])
        return (height, width) if height > 0 else None

    @property
    def assignment_digest(self) -> str:
        """A hash of every row's bucket and the bucket shapes: what the schedule and the bucketed
        latent cache depend on besides the seed."""
        shapes = [[bucket.height, bucket.width] for bucket in self.buckets]
        return hashlib.blake2b(self.bucket_of_row.tobytes() + json.dumps(shapes).encode(), digest_size=8).hexdigest()

    def counts(self) -> list[int]:
        return np.bincount(self.bucket_of_row[self.bucket_of_row >= 0], minlength=len(self.buckets)).tolist()

    def histogram(self) -> str:
        """One line for the start-up log: how many images each bucket holds."""
        counts = self.counts()
        parts = ", ".join(f"{bucket}: {count}" for bucket, count in zip(self.buckets, counts))
        left_out = int((self.bucket_of_row < 0).sum())
        text = f"buckets: {sum(counts)} images in {len(self.buckets)} bucket(s) (width x height: images): {parts}"
        if left_out:
            text += f"; {left_out} unreadable image(s) left out"
        return text + (f"; merged (fewer images than a global batch): {'; '.join(self.merges)}" if self.merges else "")


def plan_buckets(sizes: np.ndarray, sides: Sequence[int], step: int, global_batch: int) -> BucketPlan:
    """Assign each row (height, width) to its bucket, then merge buckets holding fewer than
    `global_batch` rows into their nearest neighbour, smallest first."""
    table = bucket_table(sides, step)
    natural: dict[tuple[int, int], Bucket] = {}
    assigned = []
    for height, width in sizes.tolist():
        if height <= 0:
            assigned.append(None)
            continue
        if (height, width) not in natural:
            natural[(height, width)] = nearest_bucket(height, width, table)
        assigned.append(natural[(height, width)])
    counts = Counter(bucket for bucket in assigned if bucket is not None)
    if sum(counts.values()) < global_batch:
        raise ConfigError("dataset_dir", f"{sum(counts.values())} readable images", f"fewer than one global batch "
                          f"({global_batch} = micro batch × processes); add images or lower train_micro_batch_size_per_gpu")
    target = {bucket: bucket for bucket in counts}
    merges = []
    while len(counts) > 1:
        small = min(counts, key=lambda bucket: (counts[bucket], bucket))
        if counts[small] >= global_batch:
            break
        into = min((bucket for bucket in counts if bucket != small), key=lambda bucket: (
            abs(bucket.log_aspect - small.log_aspect) + abs(math.log(bucket.height * bucket.width / (small.height * small.width))),
            bucket))
        merges.append(f"{small} ({counts[small]}) into {into}")
        counts[into] += counts.pop(small)
        target = {source: (into if final == small else final) for source, final in target.items()}
    buckets = sorted(counts, key=lambda bucket: (bucket.height * bucket.width, bucket.log_aspect))
    index = {bucket: position for position, bucket in enumerate(buckets)}
    bucket_of_row = np.array([index[target[bucket]] if bucket is not None else -1 for bucket in assigned], dtype=np.int32)
    return BucketPlan(buckets, bucket_of_row, np.asarray(sizes, dtype=np.int32).reshape(-1, 2), merges)


def bucket_plan_for(cfg: Config, sizes: np.ndarray | None, world_size: int) -> BucketPlan | None:
    """The run's buckets (None without `aspect_ratio_buckets`) from the sizes rank 0 read; ConfigError
    when fewer images than one global batch have a readable header."""
    if not cfg.aspect_ratio_buckets:
        return None
    return plan_buckets(sizes, cfg.bucket_resolutions or [cfg.resolution], cfg.bucket_step,
                        cfg.train_micro_batch_size_per_gpu * world_size)


def global_batches(bucket_of_row: np.ndarray, num_buckets: int, global_batch: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's schedule, [num_batches, global_batch] row indices: a pure function of its arguments."""
    generator = seeded_generator(seed, epoch, SCHEDULE_STREAM)
    batches = []
    for bucket in range(num_buckets):
        rows = torch.from_numpy(np.flatnonzero(bucket_of_row == bucket))
        if len(rows) == 0:
            continue
        rows = rows[torch.randperm(len(rows), generator=generator)]
        padding = -len(rows) % global_batch
        rows = torch.cat([rows, rows[:padding].repeat(math.ceil(padding / len(rows)) if padding else 0)[:padding]])
        batches.append(rows.view(-1, global_batch))
    schedule = torch.cat(batches)
    return schedule[torch.randperm(len(schedule), generator=generator)].numpy()


def batches_per_epoch(bucket_of_row: np.ndarray, global_batch: int) -> int:
    counts = np.bincount(bucket_of_row[bucket_of_row >= 0])
    return int(sum(math.ceil(count / global_batch) for count in counts if count))


class BucketBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches of the bucket schedule (a DataLoader `batch_sampler`); the same
    `set_epoch` / `set_start` as `ShardedEpochSampler`, `set_start` after `set_epoch`."""

    def __init__(self, plan: BucketPlan, micro_batch_size: int, rank: int, world_size: int, seed: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.plan = plan
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.global_batch = micro_batch_size * world_size
        self.seed = seed
        self.batches_per_epoch = batches_per_epoch(plan.bucket_of_row, self.global_batch)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def set_start(self, num_consumed: int) -> None:
        """Skip the first `num_consumed` samples of the epoch's schedule, over all ranks (the cursor of
        `data.sampler`'s contract). The schedule is cut in global micro-batches, so the cursor is a whole
        number of them; a resume on another process count must keep the global micro-batch
        (`topology.rebatched` refuses one that does not)."""
        if num_consumed % self.global_batch or not 0 <= num_consumed <= self.batches_per_epoch * self.global_batch:
            raise ValueError(f"start {num_consumed} is not a whole number of the epoch's global micro-batches "
                             f"of {self.global_batch}")
        self.start = num_consumed // self.global_batch

    def schedule(self) -> np.ndarray:
        """The whole epoch's global batches, the same on every rank."""
        return global_batches(self.plan.bucket_of_row, len(self.plan.buckets), self.global_batch, self.seed, self.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        mine = slice(self.rank * self.micro_batch_size, (self.rank + 1) * self.micro_batch_size)
        for batch in self.schedule()[self.start:]:
            yield batch[mine].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start


def cached_image_sizes(hf_dataset: datasets.Dataset, image_column: str, skip_bad_images: bool, cache_dir: Path) -> np.ndarray:
    """`read_image_sizes`, kept in `cache_dir` under the dataset's fingerprint: a restart (a resume, a
    requeued job) reads no header again. A file that cannot be read or written is simply not used."""
    key = json.dumps([hf_dataset._fingerprint, len(hf_dataset), image_column, skip_bad_images])
    path = cache_dir / f"image-sizes-{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}.npy"
    try:
        sizes = np.load(path)
        if sizes.shape == (len(hf_dataset), 2) and sizes.dtype == np.int32:
            return sizes
    except (OSError, ValueError):
        pass
    sizes = read_image_sizes(hf_dataset, image_column, skip_bad_images)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as file:
            np.save(file, sizes)
        os.replace(partial, path)  # another job writing the same sizes at once is harmless
    except OSError:
        partial.unlink(missing_ok=True)
    return sizes


def read_image_sizes(hf_dataset: datasets.Dataset, image_column: str, skip_bad_images: bool) -> np.ndarray:
    """(height, width) of every row's image from its header (PIL opens without decoding), [rows, 2]
    int32; (-1, -1) for a missing or unreadable image when `skip_bad_images`, else ConfigError."""
    sizes = np.full((len(hf_dataset), 2), -1, dtype=np.int32)
    rows = undecoded(hf_dataset.select_columns([image_column]), image_column)
    for start in range(0, len(rows), HEADER_ROWS):
        values = rows[start:start + HEADER_ROWS][image_column]
        for offset, value in enumerate(values):
            try:
                sizes[start + offset] = _header_size(value)
            except (FileNotFoundError, *_DECODE_ERRORS) as err:
                if not skip_bad_images:
                    where = value.get("path") if isinstance(value, dict) else None
                    raise _bad_image_error(image_column, start + offset, where or f"(image bytes of row {start + offset})",
                                           f"cannot read the image's header ({err})") from None
    return sizes


def _header_size(value: object) -> tuple[int, int]:
    if isinstance(value, Image.Image):
        return value.height, value.width
    if not isinstance(value, dict) or (value.get("bytes") is None and not value.get("path")):
        raise ValueError("the row holds no image")
    with Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]) as image:
        return image.height, image.width
