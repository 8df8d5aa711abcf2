"""The images of one prompt, each from its own seed: image i of prompt p starts from noise drawn
by a CPU generator seeded from (seed, p, i), so a weight, a rank count or a device does not change
which noise an image starts from, and baseline and tuned images are directly comparable."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline

from ds_diffusers.data.seeding import seeded_generator
from ds_diffusers.sampling.plan import SamplePlan


@torch.no_grad()
def generate_prompt_images(pipe: DiffusionPipeline, plan: SamplePlan, prompt_index: int,
                           output_type: str = "pil") -> Any:
    """`plan.num_images_per_prompt` images of prompt `prompt_index`: PIL images, or a float numpy
    array (N, H, W, 3) in [0, 1] with `output_type="np"`."""
    count = plan.num_images_per_prompt
    generators = [seeded_generator(plan.seed, prompt_index, index) for index in range(count)]
    latent_size = plan.resolution // pipe.vae_scale_factor
    latents = torch.stack([torch.randn((pipe.unet.config.in_channels, latent_size, latent_size), generator=generator)
                           for generator in generators])
    prompt = plan.prompts[prompt_index]
    result = pipe(
        [prompt] * count,
        negative_prompt=[plan.negative_prompt] * count if plan.negative_prompt else None,
        height=plan.resolution, width=plan.resolution,
        latents=latents.to(pipe.device, pipe.unet.dtype),
        # The same generators go on to drive the ancestral samplers' per-step noise.
        generator=generators,
        num_inference_steps=plan.num_inference_steps,
        guidance_scale=plan.guidance_scale,
        clip_skip=plan.clip_skip,
        output_type=output_type,
    )
    return result.images
