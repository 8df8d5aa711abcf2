"""The torch Dataset of (pixel_values, input_ids) and the per-rank training DataLoader."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import datasets
import torch
from torch.utils.data import DataLoader, Dataset

from ds_diffusers.data.sampler import ShardedEpochSampler, shard_length
from ds_diffusers.data.seeding import seeded_generator
from ds_diffusers.data.transforms import EMPTY_PROMPT, choose_caption, preprocess_image
from ds_diffusers.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ds_diffusers.data.cache import LatentCache, TextCache


class CaptionedImageDataset(Dataset):
    """Row `index` -> {"pixel_values", "input_ids", "index"}; with a latent cache "latent_parameters"
    replaces "pixel_values", with a text cache "encoder_hidden_states" replaces "input_ids".

    Caption choice, caption dropout, crop offset and flip come from a generator seeded with
    (seed, epoch, index), so a sample is the same whatever the worker count or order, and again
    after a resume. The cached path draws from it in the same order, so it picks the same caption,
    drops the same captions and flips the same images.
    """

    def __init__(self, hf_dataset: datasets.Dataset, image_column: str, caption_column: str,
                 tokenizer: PreTrainedTokenizerBase, resolution: int, center_crop: bool,
                 random_flip: bool, seed: int, epoch: int = 0, latent_cache: Optional[LatentCache] = None,
                 text_cache: Optional[TextCache] = None, caption_dropout: float = 0.0) -> None:
        # Decode only the columns needed: with cached latents the images are never read.
        self.rows = hf_dataset.select_columns([caption_column] if latent_cache else [image_column, caption_column])
        self.latent_cache = latent_cache
        self.text_cache = text_cache
        self.image_column = image_column
        self.caption_column = caption_column
        self.tokenizer = tokenizer
        self.resolution = resolution
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

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        generator = seeded_generator(self.seed, self.epoch, index)
        row = self.rows[index]
        caption = choose_caption(row[self.caption_column], generator, row=index)
        # Drawn only when dropout is on, so runs without it keep their streams (and caches) unchanged.
        if self.caption_dropout and float(torch.rand(1, generator=generator)) < self.caption_dropout:
            caption = EMPTY_PROMPT  # what classifier-free guidance contrasts the prompt with
        example: dict[str, Any] = {"index": index}
        if self.latent_cache is not None:
            # The cache holds centre crops only (a random crop is refused), so the flip is the one draw.
            flipped = self.random_flip and float(torch.rand(1, generator=generator)) < 0.5
            example["latent_parameters"] = self.latent_cache.parameters(index, flipped)
        else:
            example["pixel_values"] = preprocess_image(row[self.image_column], self.resolution, self.center_crop,
                                                       self.random_flip, generator)
        if self.text_cache is not None:
            example["encoder_hidden_states"] = self.text_cache.hidden_states(caption)
        else:
            example["input_ids"] = self.tokenizer(caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                                                  truncation=True, return_tensors="pt").input_ids[0]
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
                           text_cache: Optional[TextCache] = None, caption_dropout: float = 0.0,
                           ) -> tuple[DataLoader, ShardedEpochSampler, CaptionedImageDataset]:
    """This rank's DataLoader; call sampler.set_epoch and dataset.set_epoch before each epoch."""
    check_dataset_size(len(hf_dataset), micro_batch_size, world_size)
    dataset = CaptionedImageDataset(hf_dataset, image_column, caption_column, tokenizer, resolution,
                                    center_crop, random_flip, seed, latent_cache=latent_cache, text_cache=text_cache,
                                    caption_dropout=caption_dropout)
    sampler = ShardedEpochSampler(len(hf_dataset), rank, world_size, seed)
    loader = DataLoader(
        dataset,
        batch_size=micro_batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=collate_examples,
        # torch.accelerator rather than a CUDA check: pinning helps any accelerator, never a CPU run.
        pin_memory=torch.accelerator.is_available(),
        persistent_workers=num_workers > 0,
        # Its own generator: a new iterator (each epoch, or a resume mid-epoch) would otherwise draw
        # a worker seed from the global torch RNG and shift the noise stream of the training loop.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler, dataset
