"""Build the project's tiny Stable Diffusion base model in the standard diffusers folder layout.

Everything is created locally and seeded: a from-scratch CLIP BPE tokenizer, a random-init tiny
CLIP text encoder, a tiny VAE briefly trained on rendered shapes, a random-init tiny UNet and a
DDPM scheduler. The result loads with `StableDiffusionPipeline.from_pretrained(model_dir)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ds_diffusers.embedded.arch_sd import save_diffusers_folder
from ds_diffusers.embedded.recipe import DEFAULT_VAE_TRAIN_STEPS
from ds_diffusers.embedded.tokenizer import write_tokenizer
from ds_diffusers.embedded.vae_training import latent_scaling_factor, train_vae

# Short prompts ("a picture of a red circle" is 8 tokens with BOS/EOS): 16 positions halve the
# text encoder and cross-attention cost compared with 32 and truncate nothing in the dataset.
MODEL_MAX_LENGTH = 16
TEXT_HIDDEN_SIZE = 64
RESOLUTION = 64
# Three VAE blocks = two downsamples: 64 px images -> 16x16x4 latents.
VAE_BLOCK_OUT_CHANNELS = (16, 32, 32)
LATENT_CHANNELS = 4
LATENT_SIZE = RESOLUTION // 4
VAE_BATCH_SIZE = 8
VAE_LR = 3e-3
VAE_KL_WEIGHT = 1e-3
UNET_BLOCK_OUT_CHANNELS = (32, 64, 64)
# CLIP initialises token embeddings with std 0.02, far below the scale of what the random attention
# and MLP blocks add to the residual stream; the output at every position is then mostly a blend of
# the whole prompt and "red" vs "green" differ by a cosine of ~0.75. Unit-std embeddings keep each
# word's own position distinct (cosine ~0), which lets the UNet bind colour and shape words within a
# few hundred steps instead of thousands.
TOKEN_EMBEDDING_STD = 1.0


def text_encoder_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=4 * TEXT_HIDDEN_SIZE,
        projection_dim=TEXT_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        # The pooled output is taken at the EOS position; CLIP finds it by this id.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        # Every SD 1.x/2.x/XL VAE has self-attention in its mid block; the default path must run the
        # same code (it changes the posterior's memory layout, which the latent cache must handle).
        mid_block_add_attention=True,
    )


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        # Cross-attention at 8x8 and 4x4 only: enough for "which colour, which shape", and the 16x16
        # level without attention makes a step about twice as fast (measured with bench/embedded_learnability.py).
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=UNET_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        # diffusers' legacy name: this is the number of heads (head dim = channels / 8).
        attention_head_dim=8,
        norm_num_groups=8,
    )


def make_scheduler() -> DDPMScheduler:
    """Stable Diffusion 1.x's training schedule (scaled_linear betas, epsilon prediction)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def build_tiny_model(out_dir: Path, seed: int = 0, vae_train_steps: int = DEFAULT_VAE_TRAIN_STEPS) -> None:
    """Write tokenizer/, text_encoder/, vae/, unet/, scheduler/ and model_index.json into `out_dir`.

    Deterministic for a given seed and thread count; the caller's global torch RNG is untouched.
    `vae_train_steps=0` skips VAE training (fast builds for tests; decoded images are then noise).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out_dir / "tokenizer", MODEL_MAX_LENGTH)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_encoder_config(tokenizer))
        torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=TOKEN_EMBEDDING_STD)
        with torch.no_grad():
            # CLIP's init (std 0.02) makes a random encoder map every caption to nearly the same
            # hidden states; unit-variance token embeddings keep "red circle" and "blue square"
            # apart, which is what lets the frozen random encoder condition the UNet.
            text_encoder.embeddings.token_embedding.weight.normal_(0.0, 1.0)
        torch.manual_seed(seed + 1)
        vae = make_vae()
        torch.manual_seed(seed + 2)
        unet = make_unet()

    if vae_train_steps > 0:
        train_vae(vae, vae_train_steps, VAE_BATCH_SIZE, VAE_LR, VAE_KL_WEIGHT, seed=seed + 3)
    vae.eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, num_images=128, seed=seed + 4))

    save_diffusers_folder(out_dir, "StableDiffusionPipeline",
                          {"text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": make_scheduler(),
                           "tokenizer": ("transformers", "CLIPTokenizer"), "feature_extractor": None,
                           "image_encoder": None, "safety_checker": None},
                          extra={"requires_safety_checker": False})
