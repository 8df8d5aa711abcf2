"""Validation of the in-training UNet: images as a PNG grid under `output_dir/validation/`, and the
held-out loss (validation_loss.py), both from the EMA weights when they are validated.

Under ZeRO-3 every rank must run the same forward passes (parameters are gathered on the fly), so
the caller runs this on all ranks and only rank 0 saves; with ZeRO-0/1/2 rank 0 runs it alone.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from PIL import Image

from ds_diffusers.config.schema import Config
from ds_diffusers.data.cache import TextCache
from ds_diffusers.data.transforms import EMPTY_PROMPT
from ds_diffusers.distributed import DistInfo, barrier
from ds_diffusers.generation import build_pipeline, generate_images
from ds_diffusers.images import image_grid
from ds_diffusers.metrics import RunLogger
from ds_diffusers.models import FrozenComponents


def weights(ema: Any | None) -> ContextManager[None]:
    """All ranks must enter this. With an EMA, the UNet computes with the EMA weights inside it
    (`validation_use_ema`), and with the trained weights again after it."""
    return ema.swapped_in() if ema is not None else nullcontext()


@torch.no_grad()
def generate(
    frozen: FrozenComponents,
    unet: torch.nn.Module,
    prompts: Sequence[str],
    *,
    num_images: int,
    seed: int,
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
    prompt_cache: TextCache | None = None,
) -> list[list[Image.Image]]:
    """One row of `num_images` images per prompt, drawn as `python -m ds_diffusers.sample` draws them
    (`generation.generate_images`), so validation grids and sampled images start from the same noise.
    `prompt_cache` (the text encoders were freed): the prompts' and the empty prompt's stored embeddings."""
    was_training = unet.training
    unet.eval()
    pipe = build_pipeline(frozen, unet)
    rows = [
        generate_images(pipe, prompt, prompt_index, seed=seed, num_images=num_images, resolution=resolution,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        embeddings=None if prompt_cache is None else (prompt_cache.embeddings(prompt),
                                                                      prompt_cache.embeddings(EMPTY_PROMPT)))
        for prompt_index, prompt in enumerate(prompts)
    ]
    if was_training:
        unet.train()
    return rows


def save_validation_grid(rows: list[list[Image.Image]], prompts: Sequence[str], output_dir: str, global_step: int) -> Path:
    """Rank 0 only."""
    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{global_step:06d}.png"
    image_grid(rows, row_labels=list(prompts)).save(path)
    return path


def run_validation(cfg: Config, dist: DistInfo, frozen, engine, global_step: int, logger: RunLogger, ema=None,
                   held_out_loss: Callable[[], float] | None = None, prompt_cache: TextCache | None = None) -> None:
    """All ranks: the EMA swap may gather, and under ZeRO-3 the forward gathers parameters collectively;
    without ZeRO-3 rank 0 alone generates. `held_out_loss` (all ranks compute it) is logged as `val_loss`."""
    zero3 = cfg.zero_optimization.stage == 3
    with weights(ema if cfg.validates_with_ema else None):
        if held_out_loss is not None:
            was_training = engine.module.training
            engine.module.eval()
            started = time.perf_counter()
            value = held_out_loss()
            engine.module.train(was_training)
            logger.log_validation(global_step, {"val_loss": value}, time.perf_counter() - started)
        if cfg.validation_prompts:
            _generate_validation(cfg, dist, frozen, engine, global_step, logger, zero3, prompt_cache)
    barrier()


def _generate_validation(cfg: Config, dist: DistInfo, frozen, engine, global_step: int, logger: RunLogger, zero3: bool,
                         prompt_cache: TextCache | None) -> None:
    if zero3 or dist.is_main:
        # The training RNG streams must not notice validation, or resumed runs would diverge.
        with torch.random.fork_rng(devices=[]):
            rows = generate(
                frozen, engine.module, cfg.validation_prompts, num_images=cfg.num_validation_images, seed=cfg.seed,
                resolution=cfg.resolution, num_inference_steps=cfg.validation_inference_steps,
                guidance_scale=cfg.validation_guidance_scale, prompt_cache=prompt_cache,
            )
        if dist.is_main:
            path = save_validation_grid(rows, cfg.validation_prompts, cfg.output_dir, global_step)
            logger.log_images(global_step, str(path), cfg.validation_prompts)
