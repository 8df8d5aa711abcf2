"""FLUX.1 [dev] / [schnell]: `FluxTransformer2DModel` in `transformer/`, trained with the flow objective
as diffusers' DreamBooth Flux scripts train it. The text conditioning is CLIP ViT-L's pooled output
(`pooled_projections`) and T5's last hidden state (`encoder_hidden_states`, all 512 tokens); the
16-channel VAE's latents are shifted and scaled, then packed 2×2 into 64-channel tokens with their
(0, row, column) image ids. [dev] is guidance-distilled: its guidance embedder sees a fixed value in
training, `TRAINING_GUIDANCE`."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ds_diffusers.families.flow import FlowTransformerFamily
from ds_diffusers.families.base import per_image

FLUX_TEXT_PARTS = ("text_encoder_2", "tokenizer_2")
# The guidance value a guidance-distilled [dev] transformer is conditioned on in training: diffusers'
# train_dreambooth_flux.py / train_dreambooth_lora_flux.py `--guidance_scale` default (also
# FluxPipeline's sampling default). [schnell] has no guidance embedder and gets none.
TRAINING_GUIDANCE = 3.5
# diffusers' train_dreambooth_lora_flux.py default `--lora_layers`, attention projections only: both
# streams' q/k/v and outputs of the double blocks (`attn.add_*`, `attn.to_add_out`: the text stream),
# and the single blocks' q/k/v. The script's list adds the feed-forwards (`ff.net.0.proj`,
# `ff.net.2`, `ff_context.net.*`); name them in `use_lora.target_modules` to train them too.
FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2×2 patch becomes one token, row by row (FluxPipeline's packing)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height` × `width`."""
    batch, _, features = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[(H/2)(W/2), 3]: (0, row, column) of each packed token, the transformer's rotary positions."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)[:, None].expand(height // 2, width // 2)
    columns = torch.arange(width // 2, device=device, dtype=dtype)[None, :].expand(height // 2, width // 2)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)


class Flux(FlowTransformerFamily):
    name = "flux"
    title = "FLUX.1"
    pipeline_classes = ("FluxPipeline",)
    extra_parts = FLUX_TEXT_PARTS
    extra_text_parts = FLUX_TEXT_PARTS
    default_weighting_scheme = "none"  # the scripts' `--weighting_scheme` default
    denoiser_class = "FluxTransformer2DModel"
    lora_targets = FLUX_LORA_TARGETS
    samples_from_embeddings = True

    def denoiser_downsampling(self, denoiser_config: dict[str, Any]) -> int:
        return 2 * super().denoiser_downsampling(denoiser_config)  # patch_size 1, after 2×2 packing

    def load_extra_text_encoders(self, model_dir: str, variant: str | None) -> dict[str, Any]:
        from transformers import T5EncoderModel, T5TokenizerFast

        return {"tokenizer_2": T5TokenizerFast.from_pretrained(model_dir, subfolder="tokenizer_2"),
                "text_encoder_2": T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder_2", variant=variant)}

    def encode_text(self, frozen: Any, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """As FluxPipeline.encode_prompt: CLIP's pooled output, T5's last hidden state."""
        clip, t5 = frozen.text_encoder, frozen.text_encoder_2
        pooled = clip(token_ids["input_ids"].to(clip.device), output_hidden_states=False).pooler_output
        sequence = t5(token_ids["input_ids_2"].to(t5.device), output_hidden_states=False)[0]
        return {"encoder_hidden_states": sequence, "pooled_projections": pooled.to(clip.dtype)}

    def flow_forward(self, denoiser: Any, denoiser_config: Any, encoder_hidden_states: torch.Tensor,
                     added_cond_kwargs: dict[str, torch.Tensor] | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        assert added_cond_kwargs is not None
        pooled = added_cond_kwargs["pooled_projections"]

        def forward(noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            batch, _, height, width = noisy_latents.shape
            dtype, device = noisy_latents.dtype, noisy_latents.device
            guidance = None
            if denoiser_config.guidance_embeds:
                guidance = torch.full((batch,), TRAINING_GUIDANCE, device=device, dtype=torch.float32)
            # The transformer takes σ in [0, 1] (it multiplies by 1000 itself), not the scheduler's σ·N;
            # divided in fp32, as the scripts do, before the transformer casts it.
            velocity = denoiser(hidden_states=pack_latents(noisy_latents), timestep=timesteps.float() / 1000,
                                guidance=guidance, pooled_projections=pooled.to(dtype),
                                encoder_hidden_states=encoder_hidden_states.to(dtype),
                                txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=device, dtype=dtype),
                                img_ids=latent_image_ids(height, width, device, dtype), return_dict=False)[0]
            return unpack_latents(velocity, height, width)

        return forward

    def latent_channels(self, pipe: Any) -> int:
        return pipe.transformer.config.in_channels // 4  # 64 packed = 16 VAE channels × 2×2

    def pipeline_inputs(self, pipe: Any, latents: torch.Tensor, negative_prompts: list[str] | None,
                        clip_skip: int | None) -> dict[str, Any]:
        # FluxPipeline takes packed latents and has no clip_skip; a negative prompt would only act with
        # `true_cfg_scale` > 1 ([dev] is guidance-distilled: `guidance_scale` goes to its embedder).
        return {"latents": pack_latents(latents).to(pipe.vae.device, pipe.transformer.dtype)}

    def embedding_inputs(self, pipe: Any, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor],
                         num_images: int) -> dict[str, Any]:
        # No negative: [dev] is guidance-distilled (see pipeline_inputs).
        dtype = pipe.transformer.dtype
        return {"prompt_embeds": per_image(text["encoder_hidden_states"], num_images, dtype),
                "pooled_prompt_embeds": per_image(text["pooled_projections"], num_images, dtype)}

    def build_pipeline(self, frozen: Any, denoiser: torch.nn.Module, scheduler: Any) -> Any:
        from diffusers import FluxPipeline

        pipe = FluxPipeline(scheduler=scheduler, vae=frozen.vae, text_encoder=frozen.text_encoder,
                            tokenizer=frozen.tokenizer, text_encoder_2=frozen.text_encoder_2,
                            tokenizer_2=frozen.tokenizer_2, transformer=denoiser)
        pipe.set_progress_bar_config(disable=True)
        return pipe


FLUX = Flux()
