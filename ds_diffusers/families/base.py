"""What a model family is: how to recognise its folder, load its denoiser and text encoders, encode
text, condition the denoiser, which objective trains it, which pipeline samples it and which modules
LoRA adapts by default. One subclass instance per family (`sd.py`, `sdxl.py`); the rest of the
project asks the family and never tests a family's name.

Nothing here imports the config package or the models module: the config checks and the loaders
call into a family, not the other way round.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from ds_diffusers.errors import ConfigError

if TYPE_CHECKING:
    from ds_diffusers.config.schema import Config

Objective = Literal["diffusion", "flow"]
# Config keys of the flow-matching objective (flow_matching.py), refused on an ε/v-prediction family.
FLOW_KEYS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "flow_shift")
# Config keys of the ε/v objective (objective.py), refused on a flow-matching family.
DIFFUSION_KEYS = ("prediction_type", "snr_gamma")


def model_index(model_dir: str | Path) -> dict[str, Any]:
    """The folder's `model_index.json`, or {} when it is missing or unreadable."""
    try:
        return json.loads((Path(model_dir) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}


def vae_downsampling(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent along a side, from a VAE's config, as the pipelines' `vae_scale_factor` counts
    them: `AutoencoderKL` halves once per block after the first (`block_out_channels`); Qwen-Image's
    `AutoencoderKLQwenImage` once per stage (`temperal_downsample` lists them)."""
    if "temperal_downsample" in vae_config:
        return 2 ** len(vae_config["temperal_downsample"])
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def per_image(embedding: torch.Tensor, num_images: int, dtype: torch.dtype) -> torch.Tensor:
    """One prompt's stored embedding ([tokens, width] or [width]) repeated for `num_images` images."""
    return embedding.unsqueeze(0).expand(num_images, *embedding.shape).to(dtype)


class ModelFamily:
    """A model family's description. Subclasses set the class attributes and override the methods
    whose behaviour differs; an instance holds no state."""

    name: ClassVar[str]  # stored in checkpoints ("model family"), so never renamed
    title: ClassVar[str]  # for messages: "Stable Diffusion XL"
    # model_index.json `_class_name` values that mean this family.
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    # Subfolders the family needs beyond the ones every model folder has (config/checks.py).
    extra_parts: ClassVar[tuple[str, ...]] = ()
    # Text-side subfolders beyond `text_encoder/` and `tokenizer/` whose files the text cache's key hashes.
    extra_text_parts: ClassVar[tuple[str, ...]] = ()
    # What `encode_text` returns and the text cache stores, per caption.
    text_outputs: ClassVar[tuple[str, ...]] = ("encoder_hidden_states",)
    # Whether each sample carries its original size and crop (SDXL's micro-conditioning).
    records_crop: ClassVar[bool] = False
    # Whether an fp16 run keeps a `force_upcast` VAE in fp32, as the family's pipeline does.
    upcasts_vae: ClassVar[bool] = False
    objective: ClassVar[Objective] = "diffusion"
    # Whether the flow loss compares the preconditioned prediction x̂₀ = x_σ − σ·v with the latents (EDM's
    # preconditioning, diffusers' SD3 scripts' `--precondition_outputs` default) rather than v with noise − latents.
    precondition_outputs: ClassVar[bool] = False
    # The flow objective's density and weighting when `weighting_scheme` is null (diffusers' example's default).
    default_weighting_scheme: ClassVar[str] = "none"
    denoiser_folder: ClassVar[str] = "unet"
    denoiser_class: ClassVar[str] = "UNet2DConditionModel"  # the diffusers model class in denoiser_folder
    # The transformers class of `text_encoder/` (SD 3.x: CLIP-L with its projection, for the pooled vector).
    text_encoder_class: ClassVar[str] = "CLIPTextModel"
    vae_class: ClassVar[str] = "AutoencoderKL"  # the diffusers model class in `vae/` (and in `vae_path`)
    # Whether validation can hand the pipeline stored prompt embeddings (`embedding_inputs`) instead of
    # its text encoders, so a run whose text cache covers every caption frees them (data/text_prepass.py).
    samples_from_embeddings: ClassVar[bool] = False
    # The modules a LoRA adapts when `use_lora.target_modules` is null (peft `target_modules`).
    lora_targets: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")

    def detects(self, index: dict[str, Any]) -> bool:
        return index.get("_class_name") in self.pipeline_classes

    def denoiser_downsampling(self, denoiser_config: dict[str, Any]) -> int:
        """How many latent pixels one step of the denoiser's coarsest grid spans (a latent size must
        divide by it): a UNet halves its input once per block after the first; a transformer takes
        `patch_size` × `patch_size` patches."""
        if "block_out_channels" in denoiser_config:
            return 2 ** (len(denoiser_config["block_out_channels"]) - 1)
        return int(denoiser_config.get("patch_size") or 1)

    def lora_target_modules(self, configured: list[str] | None) -> list[str]:
        """`use_lora.target_modules` as configured, or this family's default when it is null."""
        return list(configured) if configured is not None else list(self.lora_targets)

    # --- loading
    def load_denoiser(self, model_dir: str, zero3_config: dict | None, rank: int, variant: str | None,
                      dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """Weights on the host in `dtype` (fp32 unless the caller only needs frozen 16-bit weights). With
        `zero3_config` (all ranks) the denoiser is partitioned while it loads (`engine.zero_load`), so no
        rank holds all of it."""
        import diffusers

        from ds_diffusers.engine.zero_load import load_partitioned

        model_class = getattr(diffusers, self.denoiser_class)
        denoiser = None
        if zero3_config is not None:
            denoiser = load_partitioned(model_dir, self.denoiser_folder, model_class, zero3_config, rank, variant)
        if denoiser is None:
            denoiser = model_class.from_pretrained(model_dir, subfolder=self.denoiser_folder, torch_dtype=dtype,
                                                   variant=variant)
        return denoiser

    def load_noise_scheduler(self, model_dir: str) -> Any:
        """The training noise scheduler from `scheduler/`: DDPM for the ε/v families."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")

    def load_text_encoder(self, model_dir: str, variant: str | None, dtype: torch.dtype) -> tuple[Any, torch.nn.Module]:
        """The tokenizer `models.tokenize` calls and the text encoder, from `tokenizer/` and `text_encoder/`;
        unfrozen (the caller freezes, casts to `dtype` and places it). CLIP (`text_encoder_class`) for SD,
        SDXL, FLUX.1 and SD 3.5."""
        import transformers

        encoder_class = getattr(transformers, self.text_encoder_class)
        return self.load_tokenizer(model_dir), encoder_class.from_pretrained(model_dir, subfolder="text_encoder", variant=variant)

    def load_tokenizer(self, model_dir: str) -> Any:
        """The tokenizer of `tokenizer/` alone (a run whose text cache covers it loads no encoder)."""
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")

    def load_extra_text_encoders(self, model_dir: str, variant: str | None) -> dict[str, Any]:
        """Tokenizers and text encoders beyond `tokenizer/` and `text_encoder/`, by FrozenComponents field
        name; loaded after the VAE and the scheduler, unfrozen (the caller freezes and places them)."""
        return {}

    def load_extra_tokenizers(self, model_dir: str) -> dict[str, Any]:
        """The tokenizers of `load_extra_text_encoders` without their encoders (a run whose text cache
        covers it): each `tokenizer*` folder of `extra_text_parts`, as its `tokenizer_config.json` names it."""
        from transformers import AutoTokenizer

        return {part: AutoTokenizer.from_pretrained(model_dir, subfolder=part) for part in self.extra_text_parts
                if part.startswith("tokenizer") and (Path(model_dir) / part).is_dir()}

    # --- encoding
    def latent_distribution(self, vae: Any, pixel_values: torch.Tensor) -> Any:
        """The VAE posterior of [B, 3, H, W] images, over [B, C, h, w] latents (a
        `DiagonalGaussianDistribution`; its `parameters` are what the latent cache stores)."""
        return vae.encode(pixel_values).latent_dist

    def image_latents(self, frozen: Any, posterior_sample: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents from a VAE posterior sample: SD's scaling (Flux and SD 3.x also
        subtract the VAE's `shift_factor` first)."""
        return posterior_sample * frozen.latent_scaling_factor

    def encode_text(self, frozen: Any, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`text_outputs` from `tokenize`d ids: SD 1.x/2.x's last hidden state of the one encoder."""
        encoder = frozen.text_encoder
        return {"encoder_hidden_states": encoder(token_ids["input_ids"].to(encoder.device), return_dict=False)[0]}

    def added_conditioning(self, frozen: Any, batch: dict[str, torch.Tensor], text: dict[str, torch.Tensor],
                           latents: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The denoiser's conditioning beyond `encoder_hidden_states` (the UNet's `added_cond_kwargs`),
        in the text encoder's device and dtype; None when the family has none."""
        return None

    def flow_forward(self, denoiser: Any, denoiser_config: Any, encoder_hidden_states: torch.Tensor,
                     added_cond_kwargs: dict[str, torch.Tensor] | None) -> Any:
        """A flow family's `denoiser_forward(noisy_latents, timesteps)` for `flow_matching_loss` and the held-out
        `fixed_sigma_loss`: latents [B, C, H, W] in, the velocity in the same shape out, the family's
        conditioning closed over."""
        raise NotImplementedError(f"{self.title} does not train with the flow objective")

    # --- sampling and export
    def save_lora_weights(self, out_dir: Any, lora_state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        """Write `pytorch_lora_weights.safetensors` from peft-named adapter tensors, in the key names the
        family's pipeline `load_lora_weights` reads; `metadata` (the adapter config) keeps alpha."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=convert_state_dict_to_diffusers(lora_state),
                                                  safe_serialization=True, unet_lora_adapter_metadata=metadata)

    def build_pipeline(self, frozen: Any, denoiser: torch.nn.Module, scheduler: Any) -> Any:
        """The family's text-to-image pipeline around the frozen components, `denoiser` and `scheduler`."""
        raise NotImplementedError

    def embedding_inputs(self, pipe: Any, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor],
                         num_images: int) -> dict[str, Any]:
        """The pipeline call's prompt arguments from one prompt's stored `text_outputs` ([tokens, width], ...)
        and the empty prompt's (the negative classifier-free guidance uses), instead of `prompt`."""
        raise NotImplementedError(f"{self.title} validation encodes its prompts with the text encoders")

    def sampling_scheduler(self, scheduler_config: Any) -> Any:
        """The default sampler of validation images: DPM-Solver++ from the model's scheduler config."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(scheduler_config)

    def latent_channels(self, pipe: Any) -> int:
        """Channels of the (unpacked) latents the pipeline's denoiser starts from."""
        return getattr(pipe, self.denoiser_folder).config.in_channels

    def pipeline_inputs(self, pipe: Any, latents: torch.Tensor, negative_prompts: list[str] | None,
                        clip_skip: int | None) -> dict[str, Any]:
        """The pipeline call's starting latents (from [N, C, h, w] noise) and the options it takes."""
        denoiser = getattr(pipe, self.denoiser_folder)
        return {"latents": latents.to(pipe.vae.device, denoiser.dtype), "negative_prompt": negative_prompts,
                "clip_skip": clip_skip}

    # --- config
    def check_config(self, cfg: "Config") -> None:
        """Objective keys that do not apply to this family's objective stop the run with one line."""
        from ds_diffusers.config.schema import Config as ConfigClass

        if self.objective == "diffusion":
            for key in FLOW_KEYS:
                value = getattr(cfg, key)
                if value != ConfigClass.model_fields[key].default:
                    raise ConfigError(key, value, f"is a flow-matching setting (Flux, SD 3.x) and {self.title} trains with "
                                      "ε or v prediction; remove it (snr_gamma weights this family's loss)")
            return
        for key in DIFFUSION_KEYS:
            value = getattr(cfg, key)
            if value is not None:
                raise ConfigError(key, value, f"{self.title} is a flow-matching model (it learns noise − latents, "
                                  "weighted by weighting_scheme); remove it")
