"""Data room: local datasets loading, PIL/torch transforms, tokenization, per-rank sampling."""

from ds_diffusers.data.cache import LatentCache, TextCache, prepare_caches
from ds_diffusers.data.dataset import (
    CaptionedImageDataset,
    build_train_dataloader,
    check_dataset_size,
    collate_examples,
    default_num_workers,
    num_batches_per_epoch,
    to_device,
)
from ds_diffusers.data.decode import check_image_files, open_image
from ds_diffusers.data.loading import CAPTION_COLUMN_CANDIDATES, load_train_dataset, resolve_columns, select_train_samples
from ds_diffusers.data.prepare import TrainData, prepare_train_data
from ds_diffusers.data.sampler import ShardedEpochSampler, shard_length
from ds_diffusers.data.seeding import seeded_generator
from ds_diffusers.data.transforms import choose_caption, preprocess_image, resize_shorter_side

__all__ = [
    "CAPTION_COLUMN_CANDIDATES",
    "CaptionedImageDataset",
    "LatentCache",
    "TextCache",
    "TrainData",
    "ShardedEpochSampler",
    "build_train_dataloader",
    "check_dataset_size",
    "check_image_files",
    "choose_caption",
    "collate_examples",
    "default_num_workers",
    "load_train_dataset",
    "num_batches_per_epoch",
    "open_image",
    "prepare_caches",
    "prepare_train_data",
    "preprocess_image",
    "resize_shorter_side",
    "resolve_columns",
    "seeded_generator",
    "select_train_samples",
    "shard_length",
    "to_device",
]
