"""An SDXL-shaped base model at test size, in the diffusers layout, built in seconds.

Every block type and option is the one of stabilityai/stable-diffusion-xl-base-1.0's config files
(UNet: DownBlock2D + 2 CrossAttnDownBlock2D, per-block transformer depth and head counts, linear
projections, `text_time` added conditioning; VAE with mid-block attention, `force_upcast`, scaling
0.13025; CLIPTextModel + CLIPTextModelWithProjection whose tokenizer pads with "!"; Euler scheduler).
Only widths, layer counts and the vocabulary are smaller. Weights are random and seeded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ds_diffusers.embedded.arch_sd import save_diffusers_folder
from ds_diffusers.embedded.tokenizer import write_tokenizer

MODEL_MAX_LENGTH = 77  # as the real tokenizers
# Real: 768 (CLIP ViT-L) and 1280 (OpenCLIP bigG, projection 1280); time embedding 256 per number.
TEXT_HIDDEN_1, TEXT_HIDDEN_2, TEXT_PROJECTION_2 = 32, 64, 64
ADDITION_TIME_EMBED_DIM = 8
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2,567,463,684 parameters); options
# left out are diffusers' defaults there too.
SDXL_BASE_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' legacy name: the number of heads (head dim 64)
    "cross_attention_dim": 2048,  # 768 + 1280: both encoders' hidden states side by side
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 x 256
    "norm_num_groups": 32,
}
# Test size: 1/10 of the channels, 1/2.5 of the heads (head dim 16), the deepest level 2 layers deep.
UNET_BLOCK_OUT_CHANNELS = (32, 64, 128)
UNET_HEADS = (2, 4, 8)
TRANSFORMER_LAYERS = (1, 2, 2)
# Real: (128, 256, 512, 512): four blocks, so latents are 1/8 of the image as in every SD VAE.
VAE_BLOCK_OUT_CHANNELS = (8, 16, 32, 32)
NORM_GROUPS = 8


def text_encoder_configs(tokenizer: CLIPTokenizer) -> tuple[CLIPTextConfig, CLIPTextConfig]:
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer), "max_position_embeddings": MODEL_MAX_LENGTH}
    # SDXL reads the penultimate layer of both, so each needs at least two (real: 12 and 32).
    first = CLIPTextConfig(hidden_size=TEXT_HIDDEN_1, intermediate_size=4 * TEXT_HIDDEN_1, projection_dim=TEXT_HIDDEN_1,
                           num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu", **ids)
    second = CLIPTextConfig(hidden_size=TEXT_HIDDEN_2, intermediate_size=4 * TEXT_HIDDEN_2, projection_dim=TEXT_PROJECTION_2,
                            num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu", **ids)
    return first, second


def make_unet(sample_size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(**{
        **SDXL_BASE_UNET,
        "sample_size": sample_size,
        "block_out_channels": UNET_BLOCK_OUT_CHANNELS,
        "transformer_layers_per_block": TRANSFORMER_LAYERS,
        "attention_head_dim": UNET_HEADS,
        "cross_attention_dim": TEXT_HIDDEN_1 + TEXT_HIDDEN_2,
        "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": TEXT_PROJECTION_2 + 6 * ADDITION_TIME_EMBED_DIM,
        "norm_num_groups": NORM_GROUPS,
    })


def make_vae(sample_size: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=NORM_GROUPS,
        sample_size=sample_size,
        scaling_factor=0.13025,
        force_upcast=True,  # the real SDXL VAE overflows in fp16
    )


def make_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
                                  timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)


def _write_second_tokenizer(out_dir: Path) -> None:
    """The OpenCLIP tokenizer of SDXL pads with "!" (id 0), not with the end token as the first."""
    write_tokenizer(out_dir, MODEL_MAX_LENGTH)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        config = json.loads((out_dir / name).read_text())
        config["pad_token"] = "!"
        (out_dir / name).write_text(json.dumps(config, indent=2) + "\n")


def build_sdxl_model(out_dir: Path, seed: int = 0, resolution: int = 64) -> Path:
    """Write an SDXL-layout folder that `StableDiffusionXLPipeline.from_pretrained(out_dir)` loads.
    The caller's global torch RNG is untouched."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out_dir / "tokenizer", MODEL_MAX_LENGTH)
    _write_second_tokenizer(out_dir / "tokenizer_2")
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer")
    first, second = text_encoder_configs(tokenizer)
    second.pad_token_id = CLIPTokenizer.from_pretrained(out_dir / "tokenizer_2").pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = {"text_encoder": CLIPTextModel(first), "text_encoder_2": CLIPTextModelWithProjection(second),
                      "vae": make_vae(resolution), "unet": make_unet(resolution // 8)}
    written_in_place = {"tokenizer": ("transformers", "CLIPTokenizer"), "tokenizer_2": ("transformers", "CLIPTokenizer")}
    save_diffusers_folder(out_dir, "StableDiffusionXLPipeline",
                          {**components, **written_in_place, "scheduler": make_scheduler(), "feature_extractor": None,
                           "image_encoder": None},
                          extra={"force_zeros_for_empty_prompt": True})
    return out_dir
