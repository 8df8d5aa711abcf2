"""The images of one prompt under a sample plan, drawn through `ds_diffusers.generation` (the path
validation uses too): image i of prompt p starts from the (plan.seed, p, i) generator's noise."""

from __future__ import annotations

from typing import Any

from diffusers import DiffusionPipeline

from ds_diffusers.generation import generate_images
from ds_diffusers.sampling.plan import SamplePlan


def generate_prompt_images(pipe: DiffusionPipeline, plan: SamplePlan, prompt_index: int,
                           output_type: str = "pil") -> Any:
    """`plan.num_images_per_prompt` images of prompt `prompt_index`: PIL images, or a float numpy
    array (N, H, W, 3) in [0, 1] with `output_type="np"`."""
    return generate_images(
        pipe, plan.prompts[prompt_index], prompt_index, seed=plan.seed, num_images=plan.num_images_per_prompt,
        resolution=plan.resolution, num_inference_steps=plan.num_inference_steps, guidance_scale=plan.guidance_scale,
        negative_prompt=plan.negative_prompt, clip_skip=plan.clip_skip, output_type=output_type,
    )
