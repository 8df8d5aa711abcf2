"""Data room: local datasets loading, PIL/torch transforms, tokenization, per-rank sampling."""

from ds_diffusers.data.cache import LatentCache, TextCache, prepare_caches
from ds_diffusers.data.dataset import (
    CaptionedImageDataset,
    build_train_dataloader,
    check_dataset_size,
    collate_examples,
    num_batches_per_epoch,
)
from ds_diffusers.data.loading import CAPTION_COLUMN_CANDIDATES, load_train_dataset, resolve_columns, select_train_samples
from ds_diffusers.data.sampler import ShardedEpochSampler, shard_length
from ds_diffusers.data.seeding import seeded_generator
from ds_diffusers.data.transforms import choose_caption, preprocess_image, resize_shorter_side

__all__ = [
    "CAPTION_COLUMN_CANDIDATES",
    "CaptionedImageDataset",
    "LatentCache",
    "TextCache",
    "ShardedEpochSampler",
    "build_train_dataloader",
    "check_dataset_size",
    "choose_caption",
    "collate_examples",
    "load_train_dataset",
    "num_batches_per_epoch",
    "prepare_caches",
    "preprocess_image",
    "resize_shorter_side",
    "resolve_columns",
    "seeded_generator",
    "select_train_samples",
    "shard_length",
]
