"""Stable Diffusion 1.x / 2.x: one CLIP text encoder (its last hidden state), a UNet trained with ε or
v prediction (the scheduler config says which), `StableDiffusionPipeline`. The fallback family: any
model folder no other family claims is read as this layout."""

from __future__ import annotations

from typing import Any

import torch

from ds_diffusers.families.base import ModelFamily, per_image


class StableDiffusion(ModelFamily):
    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline",)
    samples_from_embeddings = True

    def embedding_inputs(self, pipe: Any, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor],
                         num_images: int) -> dict[str, Any]:
        # What encode_prompt computes: the last hidden state, and the padded "" for the negative.
        return {"prompt_embeds": per_image(text["encoder_hidden_states"], num_images, pipe.unet.dtype),
                "negative_prompt_embeds": per_image(negative["encoder_hidden_states"], num_images, pipe.unet.dtype)}

    def build_pipeline(self, frozen: Any, denoiser: torch.nn.Module, scheduler: Any) -> Any:
        # Imported here: the pipeline module pulls in transformers' image processors (seconds of start-up)
        # that a training run without validation never needs.
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=frozen.vae,
            text_encoder=frozen.text_encoder,
            tokenizer=frozen.tokenizer,
            unet=denoiser,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


SD = StableDiffusion()
