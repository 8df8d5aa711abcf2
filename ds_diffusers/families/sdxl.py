"""Stable Diffusion XL: two CLIP text encoders (penultimate hidden states side by side, the second's
pooled projection), the UNet's `text_time` micro-conditioning on each sample's original size and
crop, a VAE kept in fp32 under fp16 when its config says so, `StableDiffusionXLPipeline`."""

from __future__ import annotations

from typing import Any

import torch

from ds_diffusers.families.base import ModelFamily, per_image

SDXL_PARTS = ("text_encoder_2", "tokenizer_2")


def add_time_ids(batch: dict[str, torch.Tensor], target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's six numbers per sample: original (height, width), crop (top, left), target (height, width).
    The first four are what the transforms recorded for that very sample."""
    original_size = batch["original_size"]
    # Filled on the batch's device: a tensor made from Python numbers would be a blocking host-to-GPU
    # copy in every micro-step.
    height, width = (original_size.new_full((original_size.shape[0], 1), size) for size in target_size)
    return torch.cat([original_size, batch["crop_top_left"], height, width], dim=1)


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    extra_parts = SDXL_PARTS
    extra_text_parts = SDXL_PARTS
    text_outputs = ("encoder_hidden_states", "text_embeds")
    records_crop = True
    # The SDXL pipelines upcast a force_upcast VAE; the SD 1.x/2.x ones run it in the weight dtype.
    upcasts_vae = True
    samples_from_embeddings = True

    def load_extra_text_encoders(self, model_dir: str, variant: str | None) -> dict[str, Any]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        return {"tokenizer_2": CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2"),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2",
                                                                              variant=variant)}

    def encode_text(self, frozen: Any, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """As SDXL was trained: the penultimate hidden states of both encoders side by side, and the
        second encoder's pooled projection."""
        encoder = frozen.text_encoder
        first = encoder(token_ids["input_ids"].to(encoder.device), output_hidden_states=True)
        encoder_2 = frozen.text_encoder_2
        second = encoder_2(token_ids["input_ids_2"].to(encoder_2.device), output_hidden_states=True)
        return {"encoder_hidden_states": torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1),
                "text_embeds": second.text_embeds}

    def added_conditioning(self, frozen: Any, batch: dict[str, torch.Tensor], text: dict[str, torch.Tensor],
                           latents: torch.Tensor) -> dict[str, torch.Tensor]:
        target_size = (latents.shape[-2] * frozen.vae_scale_factor, latents.shape[-1] * frozen.vae_scale_factor)
        return {"text_embeds": text["text_embeds"],
                "time_ids": add_time_ids(batch, target_size).to(text["text_embeds"].device, frozen.weight_dtype)}

    def embedding_inputs(self, pipe: Any, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor],
                         num_images: int) -> dict[str, Any]:
        dtype = pipe.unet.dtype
        inputs = {"prompt_embeds": per_image(text["encoder_hidden_states"], num_images, dtype),
                  "pooled_prompt_embeds": per_image(text["text_embeds"], num_images, dtype)}
        if not pipe.config.force_zeros_for_empty_prompt:  # otherwise the pipeline's negative is zeros
            inputs.update(negative_prompt_embeds=per_image(negative["encoder_hidden_states"], num_images, dtype),
                          negative_pooled_prompt_embeds=per_image(negative["text_embeds"], num_images, dtype))
        return inputs

    def build_pipeline(self, frozen: Any, denoiser: torch.nn.Module, scheduler: Any) -> Any:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=frozen.vae, text_encoder=frozen.text_encoder, text_encoder_2=frozen.text_encoder_2,
            tokenizer=frozen.tokenizer, tokenizer_2=frozen.tokenizer_2, unet=denoiser, scheduler=scheduler,
            force_zeros_for_empty_prompt=frozen.force_zeros_for_empty_prompt, add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


SDXL = StableDiffusionXL()
