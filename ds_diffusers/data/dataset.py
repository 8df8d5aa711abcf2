"""The torch Dataset of (pixel_values, input_ids) and the per-rank training DataLoader."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional

import datasets
import torch
from torch.utils.data import DataLoader, Dataset

from ds_diffusers.data.buckets import BucketBatchSampler, BucketPlan
from ds_diffusers.data.decode import BadImageLog, first_readable, undecoded
from ds_diffusers.data.sampler import ShardedEpochSampler, shard_length
from ds_diffusers.data.seeding import seeded_generator
from ds_diffusers.data.transforms import EMPTY_PROMPT, choose_caption, preprocess_image_to_size
from ds_diffusers.errors import ConfigError
from ds_diffusers.models import tokenize

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ds_diffusers.data.cache import LatentCache, TextCache


class CaptionedImageDataset(Dataset):
    """Row `index` -> {"pixel_values", "input_ids", "index"}; with a latent cache "latent_parameters"
    replaces "pixel_values", with a text cache the family's `text_outputs` replace "input_ids". SDXL and
    FLUX.1 add "input_ids_2", SD 3.x also "input_ids_3"; with `record_crop`, "original_size" and "crop_top_left".
    With `buckets` (aspect_ratio_buckets) a row is cropped to its bucket's shape, not resolution², and its
    original size is the one its header gave.

    Caption choice, caption dropout, crop offset and flip come from a generator seeded with
    (seed, epoch, index), so a sample is the same whatever the worker count or order, and again
    after a resume. The cached path draws from it in the same order, so it picks the same caption,
    drops the same captions and flips the same images.

    With `skip_bad_images`, an unreadable image's row is replaced by the next readable row
    (`decode.first_readable`); `bad_rows()` lists the rows skipped so far, in every worker.
    """

    def __init__(self, hf_dataset: datasets.Dataset, image_column: str, caption_column: str,
                 tokenizer: PreTrainedTokenizerBase, resolution: int, center_crop: bool,
                 random_flip: bool, seed: int, epoch: int = 0, latent_cache: Optional[LatentCache] = None,
                 text_cache: Optional[TextCache] = None, skip_bad_images: bool = False,
                 known_bad_rows: Sequence[int] = (), caption_dropout: float = 0.0,
                 tokenizer_2: Optional[PreTrainedTokenizerBase] = None, record_crop: bool = False,
                 buckets: Optional[BucketPlan] = None, tokenizer_3: Optional[PreTrainedTokenizerBase] = None) -> None:
        # Decode only the columns needed: with cached latents the images are never read. Images are
        # decoded here rather than by `datasets`, so that a failure names its file and row.
        columns = [caption_column] if latent_cache else [image_column, caption_column]
        rows = hf_dataset.select_columns(columns)
        self.rows = rows if latent_cache else undecoded(rows, image_column)
        self.bad_log = BadImageLog(len(hf_dataset), list(known_bad_rows)) if skip_bad_images else None
        self.latent_cache = latent_cache
        self.text_cache = text_cache
        self.image_column = image_column
        self.caption_column = caption_column
        named = (("input_ids", tokenizer), ("input_ids_2", tokenizer_2), ("input_ids_3", tokenizer_3))
        self.tokenizers = {name: named_tokenizer for name, named_tokenizer in named if named_tokenizer is not None}
        self.record_crop = record_crop  # SDXL: "original_size" and "crop_top_left" of each sample
        self.resolution = resolution
        self.buckets = buckets
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.caption_dropout = caption_dropout
        # A shared-memory tensor, not an int: persistent DataLoader workers hold their own copy of
        # this object, and only shared memory lets set_epoch in the main process reach them.
        self._epoch = torch.tensor([epoch], dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def bad_rows(self) -> list[int]:
        return self.bad_log.rows() if self.bad_log is not None else []

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        generator = seeded_generator(self.seed, self.epoch, index)
        if self.latent_cache is None:
            source, row, image = first_readable(self.rows, self.image_column, index, self.resolution, self.bad_log)
        else:
            source, row, image = index, self.rows[index], None
        caption = choose_caption(row[self.caption_column], generator, row=source)
        # Drawn only when dropout is on, so runs without it keep their streams (and caches) unchanged.
        if self.caption_dropout and float(torch.rand(1, generator=generator)) < self.caption_dropout:
            caption = EMPTY_PROMPT  # what classifier-free guidance contrasts the prompt with
        example: dict[str, Any] = {"index": index}
        if self.latent_cache is not None:
            # The cache holds centre crops only (a random crop is refused), so the flip is the one draw.
            flipped = self.random_flip and float(torch.rand(1, generator=generator)) < 0.5
            example["latent_parameters"] = self.latent_cache.parameters(index, flipped)
            crop = self.latent_cache.crop(index, flipped) if self.record_crop else None
        else:
            size = self.buckets.size_of(index) if self.buckets is not None else (self.resolution, self.resolution)
            example["pixel_values"], crop = preprocess_image_to_size(image, size, self.center_crop, self.random_flip, generator)
            original_size = self.buckets.original_size(source) if self.buckets is not None else None
            if original_size is not None:  # a JPEG decoded at reduced size (decode.py) still reports its real size
                crop = replace(crop, original_size=original_size)
        if self.record_crop:
            example["original_size"] = torch.tensor(crop.original_size)
            example["crop_top_left"] = torch.tensor(crop.crop_top_left)
        if self.text_cache is not None:
            example.update(self.text_cache.embeddings(caption))
        else:
            example.update({name: ids[0] for name, ids in tokenize(self.tokenizers, caption).items()})
        return example


def collate_examples(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = {name: torch.stack([example[name] for example in examples]) for name in examples[0] if name != "index"}
    batch["index"] = torch.tensor([example["index"] for example in examples], dtype=torch.long)
    return batch


def num_batches_per_epoch(dataset_len: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches each rank runs per epoch (shards truncated to equal length, last batch dropped)."""
    return shard_length(dataset_len, world_size) // micro_batch_size


def check_dataset_size(num_rows: int, micro_batch_size: int, world_size: int) -> None:
    """Raise ConfigError unless every rank gets at least one full micro-batch per epoch."""
    if micro_batch_size < 1:
        raise ConfigError("train_micro_batch_size_per_gpu", micro_batch_size, "must be at least 1")
    if num_batches_per_epoch(num_rows, micro_batch_size, world_size) == 0:
        largest = max(num_rows // world_size, 1)
        raise ConfigError("train_micro_batch_size_per_gpu", micro_batch_size,
                          f"the dataset has {num_rows} rows, fewer than {micro_batch_size} per rank × "
                          f"{world_size} ranks; use at most {largest} or add data")


def build_train_dataloader(hf_dataset: datasets.Dataset, image_column: str, caption_column: str,
                           tokenizer: PreTrainedTokenizerBase, *, resolution: int, center_crop: bool,
                           random_flip: bool, seed: int, micro_batch_size: int, num_workers: int,
                           rank: int, world_size: int, latent_cache: Optional[LatentCache] = None,
                           text_cache: Optional[TextCache] = None, pin_memory: bool = False,
                           skip_bad_images: bool = False, known_bad_rows: Sequence[int] = (),
                           caption_dropout: float = 0.0,
                           tokenizer_2: Optional[PreTrainedTokenizerBase] = None, record_crop: bool = False,
                           buckets: Optional[BucketPlan] = None, tokenizer_3: Optional[PreTrainedTokenizerBase] = None,
                           ) -> tuple[DataLoader, ShardedEpochSampler | BucketBatchSampler, CaptionedImageDataset]:
    """This rank's DataLoader; call sampler.set_epoch and dataset.set_epoch before each epoch.
    `pin_memory` when batches go to an accelerator, so `to_device` can copy them asynchronously.
    With `buckets` the micro-batches come from the bucket schedule (buckets.py), one bucket each."""
    check_dataset_size(len(hf_dataset), micro_batch_size, world_size)
    dataset = CaptionedImageDataset(hf_dataset, image_column, caption_column, tokenizer, resolution,
                                    center_crop, random_flip, seed, latent_cache=latent_cache, text_cache=text_cache,
                                    skip_bad_images=skip_bad_images, known_bad_rows=known_bad_rows,
                                    caption_dropout=caption_dropout, tokenizer_2=tokenizer_2, record_crop=record_crop,
                                    buckets=buckets, tokenizer_3=tokenizer_3)
    if buckets is not None:
        sampler = BucketBatchSampler(buckets, micro_batch_size, rank, world_size, seed)
        batching = {"batch_sampler": sampler}
    else:
        sampler = ShardedEpochSampler(len(hf_dataset), rank, world_size, seed)
        batching = {"batch_size": micro_batch_size, "sampler": sampler, "drop_last": True}
    loader = DataLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        collate_fn=collate_examples,
        pin_memory=pin_memory,
        # Workers stay for the whole run (their epoch is shared memory, see CaptionedImageDataset), and
        # each keeps two batches ready: enough to hide decode jitter without holding much host memory.
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        # Its own generator: a new iterator (each epoch, or a resume mid-epoch) would otherwise draw
        # a worker seed from the global torch RNG and shift the noise stream of the training loop.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler, dataset


def default_num_workers() -> int:
    """`dataloader_num_workers` when unset: one worker per CPU this process may run on, less one for
    the training loop itself, at most 8 (more rarely helps one GPU and multiplies host memory)."""
    return max(0, min(8, len(os.sched_getaffinity(0)) - 1))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copies that do not block the host: from pinned memory they overlap the copy with compute
    already queued; on the CPU they are the same tensors."""
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
