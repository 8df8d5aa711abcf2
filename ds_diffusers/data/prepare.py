"""The training split, prepared once per job rather than once per rank, after the process group exists.

Rank 0 loads the dataset first, which builds `datasets`' Arrow cache of a hub-layout or imagefolder
dataset the first time (under `cache_dir/datasets`, not `~/.cache/huggingface`: the user can find and
delete it), and checks it (columns, captions, image files, size for the world), while the others wait.
Then the first rank of every other node loads it: its cache is rank 0's when `cache_dir` is on a
shared filesystem, or that node's own build when it is node-local; both happen, so the order works
for either. Then all remaining ranks load it from their node's cache. No two ranks build one cache
at the same time, and a check that fails on rank 0 stops every rank with its message (exit 2),
before any folder is created; what that load added to the Arrow cache is removed again.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import datasets

from ds_diffusers.config.schema import Config
from ds_diffusers.data.buckets import BucketPlan, bucket_plan_for, cached_image_sizes
from ds_diffusers.data.dataset import check_dataset_size
from ds_diffusers.data.decode import check_image_files
from ds_diffusers.data.loading import load_train_dataset, resolve_columns, select_train_samples, split_held_out
from ds_diffusers.distributed import DistInfo, broadcast_from_main, in_turn
from ds_diffusers.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DataChecks:
    """What rank 0 found in the dataset, sent to the other ranks."""

    image_column: str
    caption_column: str
    missing_images: list[int]  # rows whose image file is missing (skip_bad_images)
    buckets: BucketPlan | None = None  # every row's bucket, from the image headers (aspect_ratio_buckets)


@dataclass(frozen=True)
class TrainData:
    dataset: datasets.Dataset
    checks: DataChecks
    held_out: datasets.Dataset | None = None  # `validation_split`'s rows, never trained on


def arrow_cache_dir(cfg: Config) -> Path:
    """Where `datasets` writes the Arrow cache of a hub-layout or imagefolder dataset."""
    return Path(cfg.cache_dir).expanduser() / "datasets"


def load_selected(cfg: Config) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The rows this run trains on (`max_train_samples` of them when set) and the held-out rows
    (`validation_split`, drawn first, or None)."""
    loaded = load_train_dataset(cfg.dataset_dir, cfg.imagefolder, cache_dir=str(arrow_cache_dir(cfg)))
    train, held_out = split_held_out(loaded, cfg.validation_split, cfg.seed)
    if cfg.validation_dataset_dir is not None:
        held_out = _as_validation_folder(lambda: load_train_dataset(cfg.validation_dataset_dir, cfg.imagefolder,
                                                                    cache_dir=str(arrow_cache_dir(cfg))), cfg)
    return select_train_samples(train, cfg.max_train_samples, cfg.seed), held_out


def _as_validation_folder(work: Callable[[], T], cfg: Config) -> T:
    """`work` on `validation_dataset_dir`, whose refusals name that key rather than `dataset_dir`."""
    try:
        return work()
    except ConfigError as error:
        inner = error.fix if error.field == "dataset_dir" else f"{error.field}={error.value!r}: {error.fix}"
        raise ConfigError("validation_dataset_dir", cfg.validation_dataset_dir, inner) from None


@contextmanager
def _removed_on_refusal(folder: Path) -> Iterator[None]:
    """A ConfigError inside removes what was added under `folder` meanwhile (a refused run leaves no
    cache behind); what was there before stays."""
    created = None  # the outermost folder of `folder`'s path that this load would create
    for path in (folder, *folder.parents):
        if path.exists():
            break
        created = path
    before = set(folder.rglob("*")) if created is None else set()
    try:
        yield
    except ConfigError:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            # Deepest first, so a new folder is empty by the time it is removed.
            for added in sorted(set(folder.rglob("*")) - before, key=lambda path: len(path.parts), reverse=True):
                if added.is_dir() and not added.is_symlink():
                    shutil.rmtree(added, ignore_errors=True)
                else:
                    added.unlink(missing_ok=True)
        raise


def load_and_check(cfg: Config, world_size: int) -> TrainData:
    """The dataset and every check of it; ConfigError naming the field, value and fix on bad data,
    with nothing this load added to the Arrow cache left behind."""
    with _removed_on_refusal(arrow_cache_dir(cfg)):
        hf_dataset, held_out = load_selected(cfg)
        image_column, caption_column = resolve_columns(hf_dataset, cfg.image_column, cfg.caption_column)
        missing_images = check_image_files(hf_dataset, image_column, cfg.skip_bad_images)
        if held_out is not None:  # its rows are decoded at every validation: a missing file is refused
            if cfg.validation_dataset_dir is not None:
                _as_validation_folder(lambda: resolve_columns(held_out, image_column, caption_column), cfg)
            check_image_files(held_out, image_column, skip_bad_images=False)
        check_dataset_size(len(hf_dataset), cfg.train_micro_batch_size_per_gpu, world_size)
        # Headers only, once per job: every rank gets the buckets with the other checks' results.
        sizes = (cached_image_sizes(hf_dataset, image_column, cfg.skip_bad_images, Path(cfg.cache_dir).expanduser())
                 if cfg.aspect_ratio_buckets else None)
        buckets = bucket_plan_for(cfg, sizes, world_size)
    return TrainData(hf_dataset, DataChecks(image_column, caption_column, missing_images, buckets), held_out)


def _size_text(folder: Path) -> str:
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.exists() else 0
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def prepare_train_data(cfg: Config, dist: DistInfo) -> TrainData:
    """All ranks must call this: the dataset on every rank, loaded and checked in the order the module
    docstring gives; a ConfigError on any rank is raised on every rank."""
    started = time.perf_counter()
    checked = in_turn(lambda: load_and_check(cfg, dist.world_size), dist.is_main)
    if dist.is_main:
        # One line, from the rank that did it: how long the other ranks waited, and that only one checked.
        arrow = arrow_cache_dir(cfg)
        print(f"ds-diffusers: dataset {cfg.dataset_dir}: {len(checked.dataset)} rows loaded and checked on rank 0 "
              f"in {time.perf_counter() - started:.1f} s; its Arrow cache {arrow} holds {_size_text(arrow)} "
              "(delete it to free the space; the next run rebuilds it)", flush=True)
    checks = broadcast_from_main(checked.checks if dist.is_main else None)
    node_first = in_turn(lambda: load_selected(cfg), not dist.is_main and dist.local_rank == 0)
    rest = in_turn(lambda: load_selected(cfg), dist.local_rank != 0)
    if dist.is_main:
        return checked
    hf_dataset, held_out = node_first if node_first is not None else rest
    return TrainData(hf_dataset, checks, held_out)
