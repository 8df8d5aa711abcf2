"""Stable Diffusion 3.5 Medium / Large: `SD3Transformer2DModel` (MMDiT; Medium's MMDiT-X blocks too)
in `transformer/`, trained with the flow objective as diffusers' DreamBooth SD3 scripts train it.

Three text encoders, as `StableDiffusion3Pipeline.encode_prompt` uses them: CLIP-L (`text_encoder/`)
and OpenCLIP bigG (`text_encoder_2/`), both `CLIPTextModelWithProjection`, give their penultimate
hidden states side by side and their projected pooled vectors concatenated (`pooled_projections`);
T5 v1.1 XXL (`text_encoder_3/`) gives its last hidden state. The CLIP states are zero-padded to T5's
width and put before T5's along the sequence (77 + `T5_SEQUENCE_LENGTH` tokens). T5 is optional as in
the pipeline: a folder whose model_index.json leaves `text_encoder_3` null trains on zeros in its place.

The 16-channel VAE's latents are shifted and scaled; the transformer takes the scheduler's timesteps
(σ·1000) and the pooled vector; the loss is preconditioned (`precondition_outputs`) and its sigmas
drawn logit-normally, the scripts' defaults. Validation images take StableDiffusion3Pipeline's own
options (negative prompt, clip_skip, 256 T5 tokens), as the scripts' validation samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ds_diffusers.errors import ConfigError
from ds_diffusers.families.base import model_index, per_image
from ds_diffusers.families.flow import FlowTransformerFamily

if TYPE_CHECKING:
    from ds_diffusers.config.schema import Config

SD3_CLIP_PARTS = ("text_encoder_2", "tokenizer_2")
SD3_T5_PARTS = ("text_encoder_3", "tokenizer_3")
# T5 tokens per caption in training: diffusers' train_dreambooth_sd3.py / train_dreambooth_lora_sd3.py
# `--max_sequence_length` default (77). StableDiffusion3Pipeline samples with 256 by default.
T5_SEQUENCE_LENGTH = 77
# diffusers' train_dreambooth_lora_sd3.py default LoRA layers (`--lora_layers` unset): the attention
# projections of both streams, joint attention only (Medium's second self-attention `attn2` is not adapted).
SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v")


def has_t5(model_dir: str | Path) -> bool:
    """Whether model_index.json names a T5 encoder (StableDiffusion3Pipeline loads `text_encoder_3=None` otherwise)."""
    entry = model_index(model_dir).get("text_encoder_3")
    return isinstance(entry, list) and entry[-1] is not None


class StableDiffusion3(FlowTransformerFamily):
    name = "sd3"
    title = "Stable Diffusion 3.5"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    extra_parts = SD3_CLIP_PARTS  # and T5's when model_index.json names it (check_config)
    extra_text_parts = SD3_CLIP_PARTS + SD3_T5_PARTS
    default_weighting_scheme = "logit_normal"  # the SD3 scripts' `--weighting_scheme` default
    precondition_outputs = True  # the SD3 scripts' `--precondition_outputs` default (1)
    denoiser_class = "SD3Transformer2DModel"
    text_encoder_class = "CLIPTextModelWithProjection"
    lora_targets = SD3_LORA_TARGETS
    samples_from_embeddings = True

    def check_config(self, cfg: "Config") -> None:
        super().check_config(cfg)
        model_dir = Path(cfg.pretrained_model_name_or_path)
        missing = [part for part in SD3_T5_PARTS if has_t5(model_dir) and not (model_dir / part).is_dir()]
        if missing:
            raise ConfigError("pretrained_model_name_or_path", str(model_dir), f"model_index.json names T5 but there is no "
                              f"{', '.join(missing)} subfolder; download the complete folder, or set \"text_encoder_3\" "
                              "and \"tokenizer_3\" to [null, null] in model_index.json to train without T5")

    def load_extra_text_encoders(self, model_dir: str, variant: str | None) -> dict[str, Any]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        parts: dict[str, Any] = {
            "tokenizer_2": CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2"),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2", variant=variant),
        }
        if has_t5(model_dir):
            # `tokenize` pads to model_max_length: the scripts' length, not the folder's 512.
            parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(model_dir, subfolder="tokenizer_3",
                                                                   model_max_length=T5_SEQUENCE_LENGTH)
            parts["text_encoder_3"] = T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder_3", variant=variant)
        else:
            import diffusers

            parts["joint_attention_dim"] = diffusers.SD3Transformer2DModel.load_config(
                model_dir, subfolder=self.denoiser_folder)["joint_attention_dim"]
        return parts

    def encode_text(self, frozen: Any, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """As StableDiffusion3Pipeline.encode_prompt (no clip_skip, `T5_SEQUENCE_LENGTH` T5 tokens)."""
        clip_states, pooled = [], []
        for encoder, name in ((frozen.text_encoder, "input_ids"), (frozen.text_encoder_2, "input_ids_2")):
            output = encoder(token_ids[name].to(encoder.device), output_hidden_states=True)
            pooled.append(output[0])  # the projected pooled vector, `text_embeds`
            clip_states.append(output.hidden_states[-2].to(frozen.text_encoder.dtype))
        clip_sequence = torch.cat(clip_states, dim=-1)
        t5 = frozen.text_encoder_3
        if t5 is None:  # the pipeline's zeros, in the first encoder's dtype
            t5_sequence = torch.zeros(clip_sequence.shape[0], T5_SEQUENCE_LENGTH, frozen.joint_attention_dim,
                                      device=clip_sequence.device, dtype=frozen.text_encoder.dtype)
        else:
            t5_sequence = t5(token_ids["input_ids_3"].to(t5.device))[0].to(t5.dtype)
        clip_sequence = torch.nn.functional.pad(clip_sequence, (0, t5_sequence.shape[-1] - clip_sequence.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip_sequence, t5_sequence], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    def flow_forward(self, denoiser: Any, denoiser_config: Any, encoder_hidden_states: torch.Tensor,
                     added_cond_kwargs: dict[str, torch.Tensor] | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        assert added_cond_kwargs is not None
        pooled = added_cond_kwargs["pooled_projections"]

        def forward(noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            # As train_dreambooth_lora_sd3.py: the scheduler's timesteps (σ·1000) as they are, unpacked latents.
            dtype = noisy_latents.dtype
            return denoiser(hidden_states=noisy_latents, timestep=timesteps,
                            encoder_hidden_states=encoder_hidden_states.to(dtype), pooled_projections=pooled.to(dtype),
                            return_dict=False)[0]

        return forward

    def embedding_inputs(self, pipe: Any, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor],
                         num_images: int) -> dict[str, Any]:
        # The empty prompt's outputs too: given no negative embeddings, the pipeline encodes "" itself.
        # Stored with the training run's T5 length (T5_SEQUENCE_LENGTH), as `encode_prompt` at
        # max_sequence_length=T5_SEQUENCE_LENGTH computes them (the pipeline's own default is 256).
        dtype, inputs = pipe.transformer.dtype, {}
        for prefix, outputs in (("", text), ("negative_", negative)):
            inputs[f"{prefix}prompt_embeds"] = per_image(outputs["encoder_hidden_states"], num_images, dtype)
            inputs[f"{prefix}pooled_prompt_embeds"] = per_image(outputs["pooled_projections"], num_images, dtype)
        return inputs

    def build_pipeline(self, frozen: Any, denoiser: torch.nn.Module, scheduler: Any) -> Any:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(
            transformer=denoiser, scheduler=scheduler, vae=frozen.vae, text_encoder=frozen.text_encoder,
            tokenizer=frozen.tokenizer, text_encoder_2=frozen.text_encoder_2, tokenizer_2=frozen.tokenizer_2,
            text_encoder_3=frozen.text_encoder_3, tokenizer_3=frozen.tokenizer_3)
        pipe.set_progress_bar_config(disable=True)
        return pipe


SD3 = StableDiffusion3()
