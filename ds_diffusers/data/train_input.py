"""A run's training input, whatever its format: the dataset checked on rank 0 first (a `datasets`
folder, or WebDataset shards), then the loop's loader, sampler and dataset built from it, with what
the run plan and the checkpoint need to know of it (row count, batches an epoch, the order's key)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ds_diffusers.config.schema import Config
from ds_diffusers.data.buckets import BucketPlan
from ds_diffusers.data.cache import TextCache, prepare_caches
from ds_diffusers.data.dataset import build_train_dataloader, default_num_workers
from ds_diffusers.data.prepare import TrainData, prepare_train_data
from ds_diffusers.data.shard_dataset import ShardData, build_shard_loader, prepare_shard_data
from ds_diffusers.data.text_prepass import TextSources
from ds_diffusers.distributed import DistInfo
from ds_diffusers.families import family_named
from ds_diffusers.models import FrozenComponents


@dataclass
class CheckedInput:
    """What rank 0 loaded and checked: exactly one of `shards` and `rows`."""

    shards: ShardData | None = None
    rows: TrainData | None = None

    @property
    def text_sources(self) -> TextSources:
        """What the text pre-pass encodes (data/text_prepass.py)."""
        if self.rows is None:
            return TextSources(None, "")
        return TextSources(self.rows.dataset, self.rows.checks.caption_column, self.rows.held_out)

    @property
    def missing_images(self) -> list[int]:
        return self.rows.checks.missing_images if self.rows is not None else []


def check_input(cfg: Config, dist: DistInfo) -> CheckedInput:
    """All ranks: the dataset loaded and checked on rank 0 first (data/prepare.py, shard_dataset.py)."""
    if cfg.dataset_format == "webdataset":
        return CheckedInput(shards=prepare_shard_data(cfg, dist))
    return CheckedInput(rows=prepare_train_data(cfg, dist))


@dataclass
class TrainInput:
    loader: Any
    sampler: Any  # set_epoch / set_start with the global cursor (data/sampler.py's contract)
    dataset: Any  # set_epoch
    num_rows: int
    batches_per_epoch: int | None  # when buckets make it other than rows / global batch
    buckets: BucketPlan | None
    data_order: str  # what the order depends on besides (seed, epoch), kept with the position
    num_workers: int


def build_input(checked: CheckedInput, cfg: Config, frozen: FrozenComponents, dist: DistInfo, pin_memory: bool,
                text_cache: TextCache | None = None) -> TrainInput:
    """All ranks: the encoder caches the cfg asks for (`text_cache`: the pre-pass's), then this process's
    loader over the input."""
    num_workers = cfg.dataloader_num_workers if cfg.dataloader_num_workers is not None else default_num_workers()
    if checked.shards is not None:  # the stream is the loop's sampler and dataset both
        loader, stream = build_shard_loader(checked.shards, cfg, frozen, dist, num_workers, pin_memory=pin_memory)
        return TrainInput(loader, stream, stream, checked.shards.num_rows, None, None, checked.shards.plan.order_key,
                          num_workers)
    hf_dataset, checks = checked.rows.dataset, checked.rows.checks
    buckets = checks.buckets
    latent_cache, text_cache = prepare_caches(cfg, hf_dataset, checks.image_column, checks.caption_column, frozen, dist,
                                              buckets=buckets, text_cache=text_cache)
    loader, sampler, dataset = build_train_dataloader(
        hf_dataset, checks.image_column, checks.caption_column, frozen.tokenizer,
        resolution=max(cfg.bucket_resolutions or [cfg.resolution]) if buckets else cfg.resolution,
        center_crop=cfg.center_crop, random_flip=cfg.random_flip, seed=cfg.seed,
        micro_batch_size=cfg.train_micro_batch_size_per_gpu, num_workers=num_workers, rank=dist.rank,
        world_size=dist.world_size, latent_cache=latent_cache, text_cache=text_cache, pin_memory=pin_memory,
        skip_bad_images=cfg.skip_bad_images, known_bad_rows=checks.missing_images, caption_dropout=cfg.caption_dropout,
        tokenizer_2=frozen.tokenizer_2, record_crop=family_named(frozen.family).records_crop, buckets=buckets,
        tokenizer_3=frozen.tokenizer_3,
    )
    num_rows = len(hf_dataset)
    data_order = f"{num_rows} rows" + (f", bucket assignment {buckets.assignment_digest}" if buckets else "")
    return TrainInput(loader, sampler, dataset, num_rows, sampler.batches_per_epoch if buckets else None, buckets, data_order,
                      num_workers)
