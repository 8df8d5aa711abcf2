"""Training from WebDataset tar shards (`dataset_format: webdataset`): raw shards (an image and its
captions, one a line, per sample) or pre-encoded ones (the frozen encoders' outputs, as the encoder cache holds them).

The order of the samples is tar_shards.py's; this module turns a process's share of it into batches.
Each process streams only its own partitions' shards; each DataLoader worker builds the micro-batches
b ≡ worker (mod workers) of its process and reads only their samples, so batches are the same whatever
the worker count, and the DataLoader hands them out in order. A sample's random draws (caption choice,
caption dropout, crop, flip) come from (seed, epoch, global position), as the Arrow path draws them from
(seed, epoch, row). webdataset keeps no position of its own (it has no state dict), so the position is
the train state's `epoch` and `samples_in_epoch`, saved with every checkpoint: the same as for the other
datasets, and enough to resume exactly because the order is a function of the seed and the epoch.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ds_diffusers.data.dataset import check_dataset_size, collate_examples
from ds_diffusers.data.decode import open_image
from ds_diffusers.data.seeding import seeded_generator
from ds_diffusers.data.tar_shards import ShardPlan, build_plan, read_partition, read_rows
from ds_diffusers.data.transforms import EMPTY_PROMPT, choose_caption, preprocess_image_with_crop
from ds_diffusers.distributed import DistInfo, broadcast_from_main, in_turn
from ds_diffusers.errors import ConfigError
from ds_diffusers.families import family_named
from ds_diffusers.families import vae_downsampling as vae_config_downsampling
from ds_diffusers.models import tokenize, vae_folder

if TYPE_CHECKING:
    from ds_diffusers.config.schema import Config
    from ds_diffusers.models import FrozenComponents

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "caption", "text")
# Pre-encoded shards: one torch tensor file per name, the values the encoder cache stores per row.
LATENTS = "latent_parameters.pth"  # VAE posterior (mean and log-variance) [2C, h, w] of the centre crop
FLIPPED = "flipped.pth"  # the same of the mirrored crop (needed with random_flip)
TEXT = "encoder_hidden_states.pth"  # the text encoder's last hidden state [tokens, width] ([captions, ...] for several)


@dataclass(frozen=True)
class ShardColumns:
    """Which files of a sample are used: image and caption extensions, or the pre-encoded tensors."""

    image: Optional[str]  # None: pre-encoded latents
    caption: Optional[str]  # None: pre-encoded text
    flipped: bool = False


def resolve_shard_columns(keys: list[str], cfg: Config, where: str) -> ShardColumns:
    """The columns of the shards from their first sample's file extensions; ConfigError naming them."""
    found = sorted(key for key in keys if not key.startswith("__"))
    if cfg.image_column is not None or LATENTS not in keys:
        image = cfg.image_column or next((ext for ext in IMAGE_EXTENSIONS if ext in keys), None)
        if image not in keys:
            raise ConfigError("image_column", cfg.image_column, f"the samples of {where} hold {found}, no image "
                              f"({'/'.join(IMAGE_EXTENSIONS)}) and no pre-encoded {LATENTS}; set image_column to the "
                              "images' file extension")
    else:
        image = None
    if cfg.caption_column is not None or TEXT not in keys:
        caption = cfg.caption_column or next((ext for ext in CAPTION_EXTENSIONS if ext in keys), None)
        if caption not in keys:
            raise ConfigError("caption_column", cfg.caption_column, f"the samples of {where} hold {found}, no caption "
                              f"({'/'.join(CAPTION_EXTENSIONS)}) and no pre-encoded {TEXT}; set caption_column to the "
                              "captions' file extension")
    else:
        caption = None
    if image is None and not cfg.center_crop:
        raise ConfigError("center_crop", False, f"the samples of {where} hold pre-encoded centre crops; set center_crop: true")
    if image is None and cfg.random_flip and FLIPPED not in keys:
        raise ConfigError("random_flip", True, f"the pre-encoded samples of {where} hold no {FLIPPED} (the mirrored "
                          "image's encoding); set random_flip: false or write the shards with random_flip")
    return ShardColumns(image, caption, flipped=image is None and cfg.random_flip)


def _tensor(sample: dict[str, Any], name: str) -> torch.Tensor:
    return torch.load(io.BytesIO(sample[name]), weights_only=True)


@dataclass(frozen=True)
class ShardData:
    """What rank 0 found in the shard folder, sent to the other ranks."""

    plan: ShardPlan
    columns: ShardColumns

    @property
    def num_rows(self) -> int:
        return self.plan.epoch_samples


def vae_downsampling(cfg: Config) -> int:
    """Pixels per latent of the config's VAE (8 for every VAE here), from its config file."""
    config = json.loads((vae_folder(cfg.pretrained_model_name_or_path, cfg.vae_path) / "config.json").read_text())
    return vae_config_downsampling(config)


def check_shards(cfg: Config, world_size: int) -> ShardData:
    """The plan and columns of `dataset_dir`'s shards, checked against the config (rank 0)."""
    plan = build_plan(cfg.dataset_dir, cfg.shard_partitions, cfg.seed)
    plan.check_world(world_size)
    shard = next(index for index, count in enumerate(plan.counts) if count)
    first = next(read_rows(plan.shards[shard], [0]))
    columns = resolve_shard_columns(list(first), cfg, plan.shards[shard])
    if columns.image is None:
        height = _tensor(first, LATENTS).shape[-2] * vae_downsampling(cfg)
        if height != cfg.resolution:
            raise ConfigError("resolution", cfg.resolution, f"the pre-encoded latents of {plan.shards[shard]} are of "
                              f"{height} px images; set resolution: {height}")
    check_dataset_size(plan.epoch_samples, cfg.train_micro_batch_size_per_gpu, world_size)
    return ShardData(plan, columns)


def prepare_shard_data(cfg: Config, dist: DistInfo) -> ShardData:
    """All ranks must call this: rank 0 scans and checks the shards, the others receive the result; a
    ConfigError stops every rank."""
    return broadcast_from_main(in_turn(lambda: check_shards(cfg, dist.world_size), dist.is_main))


class ShardSampleDecoder:
    """One webdataset sample -> the example CaptionedImageDataset gives for a row, with its draws taken
    from (seed, epoch, position) in the same order."""

    def __init__(self, columns: ShardColumns, cfg: Config, tokenizers: dict[str, Any], record_crop: bool,
                 empty_text: Optional[dict[str, torch.Tensor]]) -> None:
        self.columns, self.tokenizers, self.record_crop, self.empty_text = columns, tokenizers, record_crop, empty_text
        self.resolution, self.center_crop, self.random_flip = cfg.resolution, cfg.center_crop, cfg.random_flip
        self.seed, self.caption_dropout = cfg.seed, cfg.caption_dropout

    def __call__(self, sample: dict[str, Any], epoch: int, position: int) -> dict[str, Any]:
        generator = seeded_generator(self.seed, epoch, position)
        where = f"{sample.get('__url__')}:{sample['__key__']}"
        caption = text = None
        if self.columns.caption is not None:
            lines = sample[self.columns.caption].decode("utf-8").strip("\n").split("\n")
            caption = choose_caption(lines[0] if len(lines) == 1 else lines, generator)
        else:  # [captions, tokens, width] holds several captions' encodings, of which one is drawn
            text = _tensor(sample, TEXT)
            if text.dim() == 3:
                text = text[int(torch.randint(0, text.shape[0], (1,), generator=generator))]
        dropped = bool(self.caption_dropout) and float(torch.rand(1, generator=generator)) < self.caption_dropout
        example: dict[str, Any] = {"index": position}
        if self.columns.image is None:
            flipped = self.columns.flipped and float(torch.rand(1, generator=generator)) < 0.5
            example["latent_parameters"] = _tensor(sample, FLIPPED if flipped else LATENTS)
        else:
            image = open_image({"bytes": sample[self.columns.image], "path": where}, row=position,
                               image_column=self.columns.image, resolution=self.resolution)
            example["pixel_values"], crop = preprocess_image_with_crop(image, self.resolution, self.center_crop,
                                                                       self.random_flip, generator)
            if self.record_crop:
                example["original_size"] = torch.tensor(crop.original_size)
                example["crop_top_left"] = torch.tensor(crop.crop_top_left)
        if self.columns.caption is None:
            example.update(self.empty_text if dropped else {"encoder_hidden_states": text})
        else:
            text = EMPTY_PROMPT if dropped else caption
            example.update({name: ids[0] for name, ids in tokenize(self.tokenizers, text).items()})
        return example


class ShardStream(IterableDataset):
    """This process's micro-batches of one epoch, from its start on; also the loop's "sampler"
    (`set_epoch`, `set_start`). Epoch and start live in shared memory so persistent workers see them."""

    def __init__(self, plan: ShardPlan, decoder: ShardSampleDecoder, rank: int, world_size: int,
                 micro_batch_size: int) -> None:
        plan.check_world(world_size)
        self.plan, self.decoder, self.rank, self.world_size = plan, decoder, rank, world_size
        self.micro_batch_size = micro_batch_size
        self.num_samples = plan.epoch_samples // world_size  # per process and epoch
        self._state = torch.zeros(2, dtype=torch.long).share_memory_()  # epoch, samples of it consumed here

    def set_epoch(self, epoch: int) -> None:
        self._state[0], self._state[1] = epoch, 0

    def set_start(self, num_consumed: int) -> None:
        """Skip the first `num_consumed` positions of the epoch's global order, consumed over all ranks
        (the cursor of `data.sampler`'s contract; a whole number of rows of `world_size`). Position p is
        process p mod W's item p // W, so every process skips `num_consumed // W` of its own."""
        if num_consumed % self.world_size or not 0 <= num_consumed // self.world_size <= self.num_samples:
            raise ValueError(f"start {num_consumed} is not a whole number of rows of {self.world_size} within "
                             f"the epoch's {self.num_samples * self.world_size} samples")
        self._state[1] = num_consumed // self.world_size

    def bad_rows(self) -> list[int]:
        return []  # an unreadable image stops the run (skip_bad_images is refused with shards)

    def batch_positions(self, epoch_start: int, batch: int) -> list[int]:
        """Global positions of this process's micro-batch `batch` counted from `epoch_start`."""
        first = epoch_start + batch * self.micro_batch_size
        return [(first + offset) * self.world_size + self.rank for offset in range(self.micro_batch_size)]

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        epoch, start = (int(value) for value in self._state)
        batches = range(worker_id, (self.num_samples - start) // self.micro_batch_size, num_workers)
        # Lazily: an epoch of a large dataset has too many positions to list.
        readers = {partition: read_partition(self.plan, epoch, partition, self._items(partition, batches, start))
                   for partition in range(self.rank, self.plan.partitions, self.world_size)}
        for batch in batches:
            positions = self.batch_positions(start, batch)
            yield collate_examples([self.decoder(next(readers[self.plan.locate(p)[0]]), epoch, p) for p in positions])

    def _items(self, partition: int, batches: range, start: int) -> Iterator[int]:
        """The items of `partition` that `batches` use, in order."""
        for batch in batches:
            for position in self.batch_positions(start, batch):
                owner, item = self.plan.locate(position)
                if owner == partition:
                    yield item


@torch.no_grad()
def empty_prompt_embeddings(frozen: FrozenComponents) -> dict[str, torch.Tensor]:
    """The text encoder's outputs for the empty prompt, what caption dropout trains on with pre-encoded text."""
    encoded = frozen.encode_text(tokenize(frozen.tokenizers, [EMPTY_PROMPT]))
    return {name: tensor[0].cpu() for name, tensor in encoded.items()}


def build_shard_loader(data: ShardData, cfg: Config, frozen: FrozenComponents, dist: DistInfo, num_workers: int,
                       pin_memory: bool) -> tuple[DataLoader, ShardStream]:
    """This process's DataLoader over the shards, and the stream (call set_epoch/set_start on it)."""
    records_crop = family_named(frozen.family).records_crop
    if data.columns.image is None and records_crop:
        raise ConfigError("dataset_format", "webdataset", "pre-encoded shards hold no SDXL crop records yet; use raw "
                          "shards (image and caption) with SDXL")
    empty_text = empty_prompt_embeddings(frozen) if data.columns.caption is None and cfg.caption_dropout else None
    decoder = ShardSampleDecoder(data.columns, cfg, frozen.tokenizers, records_crop, empty_text)
    stream = ShardStream(data.plan, decoder, dist.rank, dist.world_size, cfg.train_micro_batch_size_per_gpu)
    return shard_loader(stream, num_workers, pin_memory, cfg.seed), stream


def shard_loader(stream: ShardStream, num_workers: int, pin_memory: bool, seed: int) -> DataLoader:
    """batch_size=None: the stream yields whole micro-batches, worker k the k-th of every num_workers."""
    # Its own generator: each new iterator (each epoch, and a resume) draws a base seed from it, which
    # would otherwise come from the global torch RNG and shift the loop's noise stream after a resume.
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, prefetch_factor=2 if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))
