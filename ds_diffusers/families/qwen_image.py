"""Qwen-Image (the 20B-class model, docs/memory.md): `QwenImageTransformer2DModel` in `transformer/`,
trained with the flow objective as diffusers' train_dreambooth_lora_qwen_image.py trains it.

The VAE is `AutoencoderKLQwenImage`, causal 3D: an image goes in as one frame ([B, 3, 1, H, W]) and
its posterior, one frame too, is kept without the frame axis ([B, 2C, h, w], what the latent cache
stores for every family); the latents are normalised per channel by the VAE's `latents_mean` /
`latents_std`, the inverse of what QwenImagePipeline does before decoding. The one text encoder is
Qwen2.5-VL: the caption goes into the pipeline's prompt template, the last hidden state is taken and
the template's first 34 tokens dropped. The pipeline pads to the longest prompt of a call; training
pads every caption to one fixed length (the script's `--max_sequence_length`, 512 tokens after the
drop) with a mask beside the features, so captions cache and batch alike. The transformer takes the
latents packed 2×2 (Flux's packing), the mask, each image's (frame, rows, columns) and σ = t / 1000;
there is no guidance embedder."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ds_diffusers.families.base import per_image
from ds_diffusers.families.flow import FlowTransformerFamily
from ds_diffusers.families.flux import Flux, pack_latents, unpack_latents

# QwenImagePipeline's `prompt_template_encode` and `prompt_template_encode_start_idx` (instance
# attributes there, so not importable; tests/test_qwen_image.py checks they are still the pipeline's).
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                   "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                   "<|im_start|>assistant\n")
TEMPLATE_TOKENS = 34
# train_dreambooth_lora_qwen_image.py's `--max_sequence_length` default: prompt features kept per caption.
TRAINING_MAX_SEQUENCE_LENGTH = 512
# The script's `FlowMatchEulerDiscreteScheduler.from_pretrained(..., shift=3.0)`. Qwen-Image's scheduler
# shifts dynamically, so its training sigmas are unshifted either way; kept so `flow_shift` reads the same.
TRAINING_SHIFT = 3.0


class TemplateTokenizer:
    """The Qwen2 tokenizer behind QwenImagePipeline's prompt template, `model_max_length` the template's
    dropped tokens plus the training length, padded on the right (`models.tokenize` pads to it)."""

    def __init__(self, tokenizer: Any, max_sequence_length: int = TRAINING_MAX_SEQUENCE_LENGTH) -> None:
        self.tokenizer = tokenizer
        self.model_max_length = TEMPLATE_TOKENS + max_sequence_length
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, captions: str | list[str], **kwargs: Any) -> Any:
        captions = [captions] if isinstance(captions, str) else captions
        return self.tokenizer([PROMPT_TEMPLATE.format(caption) for caption in captions], padding_side="right", **kwargs)


def template_mask(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The tokenizer's attention mask of right-padded ids: 1 up to the last non-padding token. (The
    template ends in `assistant\\n`, so that token is never padding; a pad token inside a caption is
    text, as the tokenizer's own mask has it.)"""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = torch.where(input_ids != pad_token_id, positions, -1).max(dim=1, keepdim=True).values
    return (positions <= last).long()


class QwenImage(FlowTransformerFamily):
    """A flow transformer family whose text side (one mask-carrying sequence, no pooled vector) and VAE
    (per-channel mean and std) differ from FLUX.1's and SD 3.5's; the rest is `FlowTransformerFamily`'s."""

    name = "qwen_image"
    title = "Qwen-Image"
    pipeline_classes = ("QwenImagePipeline",)
    text_outputs = ("encoder_hidden_states", "encoder_hidden_states_mask")
    default_weighting_scheme = "none"  # the script's `--weighting_scheme` default
    training_shift = TRAINING_SHIFT
    denoiser_class = "QwenImageTransformer2DModel"
    vae_class = "AutoencoderKLQwenImage"
    samples_from_embeddings = True
    # The script's default `--lora_layers`: to_k, to_q, to_v, to_out.0 (the base default; in every block
    # they are the image stream's attention projections).

    def load_text_encoder(self, model_dir: str, variant: str | None, dtype: torch.dtype) -> tuple[Any, torch.nn.Module]:
        # Loaded in the weight dtype: 8.3B parameters in fp32 would be 33 GB of host memory per process.
        from transformers import Qwen2_5_VLForConditionalGeneration

        encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, subfolder="text_encoder", variant=variant,
                                                                     dtype=dtype)
        return self.load_tokenizer(model_dir), encoder

    def load_tokenizer(self, model_dir: str) -> Any:
        from transformers import Qwen2Tokenizer

        return TemplateTokenizer(Qwen2Tokenizer.from_pretrained(model_dir, subfolder="tokenizer"))

    def latent_distribution(self, vae: Any, pixel_values: torch.Tensor) -> Any:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        # One frame in, one frame out: the same numbers as the script's 5D posterior (and its samples).
        parameters = vae.encode(pixel_values.unsqueeze(2)).latent_dist.parameters
        return DiagonalGaussianDistribution(parameters.squeeze(2))

    def image_latents(self, frozen: Any, posterior_sample: torch.Tensor) -> torch.Tensor:
        # As the script: (z − mean) × (1 / std), in fp32, then in the VAE's dtype.
        config = frozen.vae.config
        mean = torch.tensor(config.latents_mean, device=posterior_sample.device).view(1, -1, 1, 1)
        inverse_std = 1.0 / torch.tensor(config.latents_std, device=posterior_sample.device).view(1, -1, 1, 1)
        return ((posterior_sample - mean) * inverse_std).to(posterior_sample.dtype)

    def encode_text(self, frozen: Any, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """As QwenImagePipeline.encode_prompt on the unpadded tokens: the last hidden state after the
        template's first 34 tokens, zero where padded."""
        encoder = frozen.text_encoder
        input_ids = token_ids["input_ids"].to(encoder.device)
        padded_length = input_ids.shape[1]
        mask = template_mask(input_ids, frozen.tokenizer.pad_token_id)
        # Encoded padded to the batch's longest caption, as the pipeline pads: other kernel shapes would
        # change the last bits. Then zero-padded to the fixed length.
        longest = int(mask.sum(dim=1).max())
        input_ids, mask = input_ids[:, :longest], mask[:, :longest]
        hidden = encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        hidden, mask = hidden[:, TEMPLATE_TOKENS:], mask[:, TEMPLATE_TOKENS:]
        hidden = hidden * mask[..., None].to(hidden.dtype)
        fill = padded_length - longest
        return {"encoder_hidden_states": F.pad(hidden, (0, 0, 0, fill)).to(encoder.dtype),
                "encoder_hidden_states_mask": F.pad(mask, (0, fill))}

    def added_conditioning(self, frozen: Any, batch: dict[str, torch.Tensor], text: dict[str, torch.Tensor],
                           latents: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states_mask": text["encoder_hidden_states_mask"]}

    def flow_forward(self, denoiser: Any, denoiser_config: Any, encoder_hidden_states: torch.Tensor,
                     added_cond_kwargs: dict[str, torch.Tensor] | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        assert added_cond_kwargs is not None
        # The pipeline's mask dtype (int64); the batch carries it in the text encoder's dtype.
        mask = added_cond_kwargs["encoder_hidden_states_mask"].long()

        def forward(noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            batch, _, height, width = noisy_latents.shape
            # σ in [0, 1], divided in fp32 as the script does; the transformer casts it. The installed
            # diffusers reads the text lengths from the mask (older scripts also passed `txt_seq_lens`).
            velocity = denoiser(hidden_states=pack_latents(noisy_latents),
                                encoder_hidden_states=encoder_hidden_states.to(noisy_latents.dtype),
                                encoder_hidden_states_mask=mask, timestep=timesteps.float() / 1000,
                                img_shapes=[(1, height // 2, width // 2)] * batch, return_dict=False)[0]
            return unpack_latents(velocity, height, width)

        return forward

    # As FLUX.1's: 16 VAE channels packed into the transformer's 64. The LoRA file (peft names under
    # `transformer.`) and the sampler (flow Euler, the config's exponential dynamic shift) are the base's.
    latent_channels = Flux.latent_channels

    def pipeline_inputs(self, pipe: Any, latents: torch.Tensor, negative_prompts: list[str] | None,
                        clip_skip: int | None) -> dict[str, Any]:
        # Packed latents; no clip_skip. Guidance is "true" CFG: with a negative prompt the pipeline runs
        # it at its `true_cfg_scale` default (4.0); without one, 1.0 says no CFG (and no warning about it).
        inputs: dict[str, Any] = {"latents": pack_latents(latents).to(pipe.vae.device, pipe.transformer.dtype)}
        if negative_prompts:
            inputs["negative_prompt"] = negative_prompts
        else:
            inputs["true_cfg_scale"] = 1.0
        return inputs

    def embedding_inputs(self, pipe: Any, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor],
                         num_images: int) -> dict[str, Any]:
        # The stored sequence is zero-padded to TRAINING_MAX_SEQUENCE_LENGTH with its mask (the transformer masks the
        # padding out of attention). No negative: without a negative prompt pipeline_inputs turns true CFG off.
        return {"prompt_embeds": per_image(text["encoder_hidden_states"], num_images, pipe.transformer.dtype),
                "prompt_embeds_mask": per_image(text["encoder_hidden_states_mask"], num_images, torch.long)}

    def build_pipeline(self, frozen: Any, denoiser: torch.nn.Module, scheduler: Any) -> Any:
        from diffusers import QwenImagePipeline

        pipe = QwenImagePipeline(scheduler=scheduler, vae=frozen.vae, text_encoder=frozen.text_encoder,
                                 tokenizer=frozen.tokenizer.tokenizer, transformer=denoiser)
        pipe.set_progress_bar_config(disable=True)
        return pipe


QWEN_IMAGE = QwenImage()
