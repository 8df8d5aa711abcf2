"""Text-to-image generation shared by validation (training side) and sampling (`ds_diffusers.sample`):
the family's pipeline around the frozen components and a UNet, and the noise each image starts from.

Image i of prompt p starts from noise drawn by a CPU generator seeded from (seed, p, i), so a weight,
a rank count or a device does not change which noise an image starts from: validation grids, sampled
baseline images and sampled tuned images are directly comparable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ds_diffusers.data.seeding import seeded_generator
from ds_diffusers.families import family_named, family_of_pipeline
from ds_diffusers.models import FrozenComponents

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline


def build_pipeline(frozen: FrozenComponents, unet: torch.nn.Module) -> "StableDiffusionPipeline | StableDiffusionXLPipeline":
    """The family's text-to-image pipeline around these components (`ModelFamily.build_pipeline`; SDXL:
    both encoders, `text_time`), with the family's sampler built from the model's own scheduler config
    (DPM-Solver++; FLUX.1: flow-matching Euler)."""
    family = family_named(frozen.family)
    return family.build_pipeline(frozen, unet, family.sampling_scheduler(frozen.noise_scheduler.config))


def image_generators(seed: int, prompt_index: int, num_images: int) -> list[torch.Generator]:
    """One CPU generator per image of prompt `prompt_index`, seeded from (seed, prompt_index, image_index)."""
    return [seeded_generator(seed, prompt_index, image_index) for image_index in range(num_images)]


def starting_latents(generators: list[torch.Generator], channels: int, latent_size: int) -> torch.Tensor:
    """The initial noise of each image, one draw per generator, on the CPU (so it is the same on every device)."""
    return torch.stack([torch.randn((channels, latent_size, latent_size), generator=generator) for generator in generators])


@torch.no_grad()
def generate_images(
    pipe: "DiffusionPipeline",
    prompt: str,
    prompt_index: int,
    *,
    seed: int,
    num_images: int,
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
    negative_prompt: str = "",
    clip_skip: int | None = None,
    output_type: str = "pil",
    embeddings: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
) -> Any:
    """`num_images` images of `prompt`, image i from the (seed, prompt_index, i) generator: PIL images,
    or a float numpy array (N, H, W, 3) in [0, 1] with `output_type="np"`. `embeddings`: the prompt's and
    the empty prompt's stored text outputs, given to the pipeline instead of `prompt` (no text encoders)."""
    family = family_of_pipeline(pipe)
    generators = image_generators(seed, prompt_index, num_images)
    latents = starting_latents(generators, family.latent_channels(pipe), resolution // pipe.vae_scale_factor)
    prompts: dict[str, Any] = {"prompt": [prompt] * num_images}
    if embeddings is not None:
        prompts = family.embedding_inputs(pipe, *embeddings, num_images)
    elif clip_skip and not hasattr(pipe.text_encoder, "text_model") and not hasattr(pipe, "text_encoder_2"):
        # diffusers' SD pipeline applies clip_skip through `text_encoder.text_model`, which transformers
        # 5 removed (CLIPTextModel now holds its layers itself): the same embeddings, computed here.
        prompts = {"prompt_embeds": clip_skip_embeddings(pipe, prompt, clip_skip).expand(num_images, -1, -1)}
        clip_skip = None
    result = pipe(
        **prompts,
        height=resolution, width=resolution,
        # The same generators go on to drive the ancestral samplers' per-step noise.
        generator=generators,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        output_type=output_type,
        **family.pipeline_inputs(pipe, latents, [negative_prompt] * num_images if negative_prompt else None, clip_skip),
    )
    return result.images


@torch.no_grad()
def clip_skip_embeddings(pipe: "StableDiffusionPipeline", prompt: str, clip_skip: int) -> torch.Tensor:
    """What `StableDiffusionPipeline.encode_prompt` computes for `clip_skip`: the hidden states
    `clip_skip` layers before the last, through the encoder's final layer norm ([1, tokens, width])."""
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    tokens = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").to(encoder.device)
    attention_mask = tokens.attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
    hidden = encoder(tokens.input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return encoder.final_layer_norm(hidden).to(dtype=encoder.dtype)
