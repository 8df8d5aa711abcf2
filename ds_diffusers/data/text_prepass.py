"""The text pre-pass: which text encoders a run holds while it trains, and the encoding done before.

When the text cache covers every caption the run can draw (`cache_text_embeddings` on a `datasets`
input: `distinct_captions` holds every choice of every row and the empty prompt of caption dropout),
the encoders are needed only to fill the caches. The pre-pass then fills, on all ranks, each rank its
share (data/cache.py), the text cache and a prompt cache of everything else a run encodes: the
validation prompts, the empty prompt (the negative of classifier-free guidance) and the held-out
rows' captions (validation_loss.py); then it frees the encoders, or never loads them when both caches
exist. Validation pipelines get prompt embeddings (`ModelFamily.embedding_inputs`). Otherwise (no
text cache, WebDataset shards, or a family that cannot sample from embeddings) the encoders are
loaded for the whole run, as they always were.

`text_encoder_zero3` loads the encoders partitioned for the pre-pass (`models.load_text_encoders`):
ZeRO-3 inference gathers one layer at a time inside each forward, collectively, so every rank runs
the same number of forward passes (`encode_captions(pad_to=...)`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import datasets
import torch

from ds_diffusers.config.schema import Config
from ds_diffusers.data.cache import CacheKey, TextCache, build_text_cache, distinct_captions, is_built, text_key
from ds_diffusers.data.transforms import EMPTY_PROMPT
from ds_diffusers.distributed import DistInfo, broadcast_from_main
from ds_diffusers.errors import ConfigError
from ds_diffusers.families import family_named
from ds_diffusers.models import DTYPES, FrozenComponents, encoder_bytes, load_text_encoders


@dataclass
class TextInput:
    """The text side of a run after the pre-pass."""

    text_cache: TextCache | None  # the training captions' embeddings
    prompt_cache: TextCache | None  # validation prompts, "" and held-out captions (None: encoders kept)
    line: str  # the start-up line: freed, never loaded or kept, and the bytes of weights held


@dataclass(frozen=True)
class TextSources:
    """What the run encodes: the training dataset's captions, and the other prompts."""

    dataset: datasets.Dataset | None  # None: WebDataset shards (no text cache)
    caption_column: str
    held_out: datasets.Dataset | None = None


def extra_prompts(cfg: Config, sources: TextSources) -> list[str]:
    """Every prompt a run encodes besides the training captions, once each, sorted."""
    held_out = distinct_captions(sources.held_out, sources.caption_column) if sources.held_out is not None else []
    return sorted({*cfg.validation_prompts, EMPTY_PROMPT, *held_out})


def prompt_key(cfg: Config, sources: TextSources, prompts: list[str]) -> CacheKey:
    """The text cache's key with the prompts' digest in place of the dataset's."""
    parts = {name: value for name, value in text_key(cfg, sources.dataset, sources.caption_column).parts.items()
             if name not in ("dataset", "caption_column", "with_empty_prompt")}
    parts["prompts"] = hashlib.blake2b(json.dumps(prompts).encode(), digest_size=8).hexdigest()
    return CacheKey("prompts", parts)


def uncovered_reason(cfg: Config, sources: TextSources, frozen: FrozenComponents) -> str | None:
    """Why the text encoders must stay for the whole run, or None when the caches cover it."""
    family = family_named(frozen.family)
    if sources.dataset is None:
        return "WebDataset shards: no text cache"
    if not cfg.cache_text_embeddings:
        return "no text cache: cache_text_embeddings is false"
    if not family.samples_from_embeddings and cfg.validation_prompts and cfg.validation_steps:
        return f"{family.title} validation encodes its prompts (validation_prompts)"
    return None


def check_zero3_encoders(cfg: Config, reason: str | None) -> None:
    if cfg.text_encoder_zero3 and reason is not None:
        raise ConfigError("text_encoder_zero3", True, f"partitioned text encoders run only in the pre-pass of a run whose "
                          f"text cache covers every caption, and this one is not covered ({reason}); set "
                          "cache_text_embeddings=true on a datasets input, or remove text_encoder_zero3")


def zero3_encoder_config(cfg: Config) -> dict:
    """The DeepSpeed config of the encoders' ZeRO-3 inference: stage 3 in the weight dtype, no optimizer."""
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
            "bf16": {"enabled": cfg.weight_dtype_name == "bfloat16"}, "fp16": {"enabled": cfg.weight_dtype_name == "float16"}}


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"


def _names(frozen: FrozenComponents) -> str:
    return ", ".join(f"{name} ({type(encoder).__name__})" for name, encoder in frozen.text_encoders.items())


def prepare_text(cfg: Config, sources: TextSources, frozen: FrozenComponents, dist: DistInfo,
                 log: Callable[[str], None] = print) -> TextInput:
    """All ranks must call this, after `load_frozen_components(with_text_encoders=False)`. Loads the
    encoders into `frozen` when the run needs them, fills the caches, and frees them when covered."""
    reason = uncovered_reason(cfg, sources, frozen)
    check_zero3_encoders(cfg, reason)
    dtype = DTYPES[cfg.weight_dtype_name]
    model_dir = cfg.pretrained_model_name_or_path
    if reason is not None:
        _load_into(frozen, model_dir, dist, dtype, cfg.variant, None)
        held = sum(encoder_bytes(encoder) for encoder in frozen.text_encoders.values())
        return TextInput(None, None, f"text encoders kept for training ({reason}): {_names(frozen)}, "
                                     f"{_gigabytes(held)} of weights held by each process in training")
    prompts = extra_prompts(cfg, sources)
    captions_key = lambda: text_key(cfg, sources.dataset, sources.caption_column)  # noqa: E731
    prompts_key = lambda: prompt_key(cfg, sources, prompts)  # noqa: E731
    both_cached = broadcast_from_main(all(is_built(key(), cfg.cache_dir) for key in (captions_key, prompts_key))
                                      if dist.is_main else None)
    if both_cached:
        line = "text encoders never loaded (the text and prompt caches cover every caption): 0 bytes of encoder weights held"
    else:
        zero3 = zero3_encoder_config(cfg) if cfg.text_encoder_zero3 else None
        _load_into(frozen, model_dir, dist, dtype, cfg.variant, zero3)
        names = _names(frozen)
        loaded = sum(encoder_bytes(encoder) for encoder in frozen.text_encoders.values())
        layout = "partitioned by ZeRO-3" if zero3 is not None else "on every process"
        line = (f"text encoders freed after the pre-pass ({names}: {_gigabytes(loaded)} of weights per process "
                f"{layout} in the pre-pass, 0 bytes held in training)")
    pad = cfg.text_encoder_zero3  # partitioned forwards are collective: every rank runs as many
    text_cache = build_text_cache(cfg, dist, frozen, captions_key,
                                  distinct_captions(sources.dataset, sources.caption_column), pad, log)
    prompt_cache = build_text_cache(cfg, dist, frozen, prompts_key, prompts, pad, log)
    frozen.free_text_encoders()
    return TextInput(text_cache, prompt_cache, line)


def _load_into(frozen: FrozenComponents, model_dir: str, dist: DistInfo, dtype: torch.dtype, variant: str | None,
               zero3_config: dict | None) -> None:
    for name, part in load_text_encoders(model_dir, dist.device, dtype, variant, zero3_config).items():
        setattr(frozen, name, part)
