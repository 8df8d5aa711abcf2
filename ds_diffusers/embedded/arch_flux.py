"""FLUX.1 [dev] / [schnell] architectures with random weights, in the diffusers folder layout.

The configs are the published checkpoints' `config.json` values (black-forest-labs/FLUX.1-dev and
FLUX.1-schnell: transformer/, vae/, text_encoder/ (CLIP ViT-L/14 text tower), text_encoder_2/ (T5
v1.1 XXL), scheduler/). `size="full"` is only ever built on the meta device (`count_parameters`:
the dev transformer has 11,901,408,320 parameters, the published "12B"/11.9B); `size="test"` keeps
every block type and option (19+38 double/single blocks become 2+2, 24 heads of 128 become 2 of 16,
rotary axes split 16/56/56 -> 4/6/6, the guidance embedder of dev, the 2x2 latent packing into 64
input channels, the 16-channel VAE with shift and scale, T5's gated GELU) and writes a folder that
`FluxPipeline.from_pretrained` loads and samples at 64 px on a CPU in about a second.

The test transformer is saved in shards (`max_shard_size`), so the folder has the
`diffusion_pytorch_model.safetensors.index.json` the real 23.8 GB transformer ships with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from ds_diffusers.embedded.arch_flow import flow_vae_config, meta_parameters, random_t5_encoder, t5_config, write_t5_tokenizer
from ds_diffusers.embedded.arch_sd import FULL as SD_FULL, random_clip_text_encoder, save_diffusers_folder, write_clip_tokenizer
from ds_diffusers.embedded.tokenizer import EOS_TOKEN

Variant = Literal["dev", "schnell"]
Size = Literal["full", "test"]
# FLUX.1-dev transformer/config.json (schnell: the same without the guidance embedder).
FLUX_DEV_TRANSFORMER = {
    "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "patch_size": 1, "pooled_projection_dim": 768,
}
FLUX_TEST_TRANSFORMER = {"attention_head_dim": 16, "axes_dims_rope": [4, 6, 6], "num_attention_heads": 2,
                         "num_layers": 2, "num_single_layers": 2}
# FLUX.1-dev scheduler/scheduler_config.json: resolution-dependent shift (`mu` from the token count).
FLUX_DEV_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                      "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
# FLUX.1-schnell: timestep-distilled, a fixed shift of 1.
FLUX_SCHNELL_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
# FLUX.1-dev vae/config.json.
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159
# The tokenizers' lengths in the real folders: CLIP 77, T5 512 (the pipeline uses at most 512).
CLIP_MAX_LENGTH, T5_MAX_LENGTH = 77, 512
# Published sizes (the model cards' "12 billion parameter" is this count rounded).
FLUX_DEV_PARAMETERS = 11_901_408_320
TEST_SHARD_SIZE = "200KB"


@dataclass(frozen=True)
class FluxArch:
    """Config dicts of one FLUX.1 variant at one size; `build_flux` writes them as a folder."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]  # CLIP ViT-L/14's text tower: the pooled prompt vector
    text_encoder_2: dict[str, Any]  # T5 v1.1 XXL: the per-token prompt features
    scheduler: dict[str, Any]


def flux_arch(variant: Variant = "dev", size: Size = "test") -> FluxArch:
    """The real configs of FLUX.1 `variant` (`size="full"`) or their narrow test version."""
    if variant not in ("dev", "schnell"):
        raise ValueError(f"variant={variant!r}: use 'dev' or 'schnell'")
    if size not in ("full", "test"):
        raise ValueError(f"size={size!r}: use 'full' or 'test'")
    clip = SD_FULL["sd15"].text_encoder  # the same openai/clip-vit-large-patch14 text config
    arch = FluxArch(
        transformer={**FLUX_DEV_TRANSFORMER, "guidance_embeds": variant == "dev"},
        vae=flow_vae_config("full", FLUX_VAE_SCALING, FLUX_VAE_SHIFT),
        text_encoder=dict(clip), text_encoder_2=t5_config("full"),
        scheduler=FLUX_DEV_SCHEDULER if variant == "dev" else FLUX_SCHNELL_SCHEDULER,
    )
    if size == "full":
        return arch
    text_encoder = {**clip, "hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 2, "projection_dim": 48}
    text_encoder_2 = t5_config("test")
    return replace(arch, vae=flow_vae_config("test", FLUX_VAE_SCALING, FLUX_VAE_SHIFT), text_encoder=text_encoder,
                   text_encoder_2=text_encoder_2,
                   transformer={**arch.transformer, **FLUX_TEST_TRANSFORMER, "joint_attention_dim": text_encoder_2["d_model"],
                                "pooled_projection_dim": text_encoder["hidden_size"]})


def build_flux(out_dir: Path, variant: Variant = "dev", size: Size = "test", seed: int = 0,
               max_shard_size: str = TEST_SHARD_SIZE) -> FluxArch:
    """Write a random-weight FLUX.1 `variant` of `size` into `out_dir` (diffusers layout, transformer
    in shards of `max_shard_size`); `FluxPipeline.from_pretrained(out_dir)` loads it. The caller's
    torch RNG is untouched."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    arch = flux_arch(variant, size)
    out_dir = Path(out_dir)
    tokenizer = write_clip_tokenizer(out_dir / "tokenizer", CLIP_MAX_LENGTH, EOS_TOKEN)
    tokenizer_2 = write_t5_tokenizer(out_dir / "tokenizer_2", T5_MAX_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = random_clip_text_encoder(arch.text_encoder, tokenizer, shrink_vocab=size == "test")
        torch.manual_seed(seed + 1)
        text_encoder_2 = random_t5_encoder({**arch.text_encoder_2, "vocab_size": len(tokenizer_2)}
                                           if size == "test" else arch.text_encoder_2)
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(**arch.vae)
        torch.manual_seed(seed + 3)
        transformer = FluxTransformer2DModel(**arch.transformer)
    transformer.save_pretrained(out_dir / "transformer", max_shard_size=max_shard_size)
    components = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "vae": vae,
                  "scheduler": FlowMatchEulerDiscreteScheduler(**arch.scheduler),
                  "transformer": ("diffusers", "FluxTransformer2DModel"),
                  "tokenizer": ("transformers", "CLIPTokenizer"), "tokenizer_2": ("transformers", "T5TokenizerFast"),
                  "feature_extractor": None, "image_encoder": None}
    save_diffusers_folder(out_dir, "FluxPipeline", components)
    return arch


def count_parameters(variant: Variant = "dev", size: Size = "full") -> dict[str, int]:
    """Parameters of each FLUX.1 model, built on the meta device."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = flux_arch(variant, size)
    return {"transformer": meta_parameters(lambda: FluxTransformer2DModel(**arch.transformer)),
            "vae": meta_parameters(lambda: AutoencoderKL(**arch.vae)),
            "text_encoder": meta_parameters(lambda: CLIPTextModel(CLIPTextConfig(**arch.text_encoder))),
            "text_encoder_2": meta_parameters(lambda: random_t5_encoder(arch.text_encoder_2))}
