"""Validation images from the in-training UNet, saved as a PNG grid under `output_dir/validation/`.

Under ZeRO-3 every rank must run the same forward passes (parameters are gathered on the fly), so
the caller runs this on all ranks and only rank 0 saves; with ZeRO-0/1/2 rank 0 runs it alone.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Sequence

import torch
from PIL import Image

from ds_diffusers.data.seeding import seeded_generator
from ds_diffusers.images import image_grid
from ds_diffusers.models import FrozenComponents

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline


def weights(ema: Any | None) -> ContextManager[None]:
    """All ranks must enter this. With an EMA, the UNet computes with the EMA weights inside it
    (`validation_use_ema`), and with the trained weights again after it."""
    return ema.swapped_in() if ema is not None else nullcontext()


def build_pipeline(frozen: FrozenComponents, unet: torch.nn.Module) -> "StableDiffusionPipeline | StableDiffusionXLPipeline":
    """The family's text-to-image pipeline around these components (SDXL: both encoders, `text_time`)."""
    # Imported here: the pipeline module pulls in transformers' image processors (seconds of start-up)
    # that a run without validation never needs.
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if frozen.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=frozen.vae, text_encoder=frozen.text_encoder, text_encoder_2=frozen.text_encoder_2,
            tokenizer=frozen.tokenizer, tokenizer_2=frozen.tokenizer_2, unet=unet,
            scheduler=DPMSolverMultistepScheduler.from_config(frozen.noise_scheduler.config),
            force_zeros_for_empty_prompt=frozen.force_zeros_for_empty_prompt, add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = StableDiffusionPipeline(
        vae=frozen.vae,
        text_encoder=frozen.text_encoder,
        tokenizer=frozen.tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(frozen.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
) -> list[list[Image.Image]]:
    """One row of `num_images` images per prompt; image i of prompt p is seeded from (seed, p, i), as
    in `python -m ds_diffusers.sample`, so validation grids and sampled images start from the same noise."""
    was_training = unet.training
    unet.eval()
    pipe = build_pipeline(frozen, unet)
    rows = []
    for p, prompt in enumerate(prompts):
        generators = [seeded_generator(seed, p, i) for i in range(num_images)]
        # Noise is drawn on the CPU generator and moved, so images do not depend on the device.
        latents = torch.stack([
            torch.randn((unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor), generator=g)
            for g in generators
        ]).to(frozen.vae.device, unet.dtype)
        result = pipe([prompt] * num_images, height=resolution, width=resolution, latents=latents,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        rows.append(result.images)
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
