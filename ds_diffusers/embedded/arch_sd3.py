"""Stable Diffusion 3.5 Medium / Large architectures with random weights, in the diffusers layout.

The configs are the published checkpoints' `config.json` values (stabilityai/stable-diffusion-3.5-
medium and -large: transformer/ (SD3Transformer2DModel, MMDiT), vae/, text_encoder/ (CLIP ViT-L/14
with projection), text_encoder_2/ (OpenCLIP bigG/14 with projection), text_encoder_3/ (T5 v1.1
XXL), scheduler/). `size="full"` is built on the meta device only (`count_parameters`: Large
8,056,627,520, the published 8.1B; Medium 2,243,171,520, which Stability AI announces as "2.5
billion" - the config as published gives 2.24B, see docs/memory.md); `size="test"` keeps every option (QK
RMS-norm, Medium's dual-attention (MMDiT-X) layers in the first half, the position-embedding
crop size relative to the sample size, the pooled width = both CLIP projections, the T5 width
carrying both CLIP widths side by side) and writes a folder that
`StableDiffusion3Pipeline.from_pretrained` loads and samples at 64 px on a CPU in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from ds_diffusers.embedded.arch_flow import (TEST_RESOLUTION, flow_vae_config, meta_parameters, random_t5_encoder,
                                             t5_config, write_t5_tokenizer)
from ds_diffusers.embedded.arch_sd import FULL as SD_FULL, random_clip_text_encoder, save_diffusers_folder, write_clip_tokenizer
from ds_diffusers.embedded.tokenizer import EOS_TOKEN

Variant = Literal["medium", "large"]
Size = Literal["full", "test"]
# stable-diffusion-3.5-large transformer/config.json.
SD35_LARGE_TRANSFORMER = {
    "attention_head_dim": 64, "caption_projection_dim": 2432, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 38, "num_layers": 38, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192, "qk_norm": "rms_norm", "sample_size": 128,
}
# stable-diffusion-3.5-medium transformer/config.json: MMDiT-X, self-attention added in blocks 0-12.
SD35_MEDIUM_TRANSFORMER = {
    "attention_head_dim": 64, "caption_projection_dim": 1536, "dual_attention_layers": list(range(13)),
    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16,
    "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm", "sample_size": 128,
}
# Both scheduler/scheduler_config.json files.
SD35_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
# Both vae/config.json files.
SD35_VAE_SCALING, SD35_VAE_SHIFT = 1.5305, 0.0609
# laion/CLIP-ViT-bigG-14's text tower as SD 3.5 ships it (text_encoder_2/config.json).
CLIP_BIGG = {**SD_FULL["sd15"].text_encoder, "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
             "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280}
# The tokenizers' model_max_length in the real folders (the pipeline encodes 256 T5 tokens by default).
CLIP_MAX_LENGTH, T5_MAX_LENGTH = 77, 512
# The configs' exact counts. Published: Large "8.1 billion" (matches); Medium "2.5 billion" (the model
# card and announcement), 10% above what its published transformer config builds.
SD35_LARGE_PARAMETERS = 8_056_627_520
SD35_MEDIUM_PARAMETERS = 2_243_171_520

# Test size: heads and depth shrink, head dim 64 -> 16; the caption width stays heads x head dim and
# the position crop keeps its ratio to the sample size (Medium 3x, Large 1.5x). Both CLIPs keep
# their head counts (12 and 20, head dim 4) and at least two layers (the pipeline reads the penultimate).
_TEST_CLIP_1 = {"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 2, "projection_dim": 48}
_TEST_CLIP_2 = {"hidden_size": 80, "intermediate_size": 320, "num_hidden_layers": 2, "projection_dim": 80}
_TEST_T5 = {"d_model": 128, "d_ff": 320, "d_kv": 32}  # >= the two CLIP widths side by side (48 + 80)
_TEST_TRANSFORMER = {"attention_head_dim": 16, "num_attention_heads": 2, "caption_projection_dim": 32,
                     "num_layers": 2, "joint_attention_dim": _TEST_T5["d_model"],
                     "pooled_projection_dim": _TEST_CLIP_1["projection_dim"] + _TEST_CLIP_2["projection_dim"],
                     "sample_size": TEST_RESOLUTION // 8}


@dataclass(frozen=True)
class SD3Arch:
    """Config dicts of one SD 3.5 variant at one size; `build_sd3` writes them as a folder."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    text_encoder_3: dict[str, Any]
    scheduler: dict[str, Any]


def sd3_arch(variant: Variant = "medium", size: Size = "test") -> SD3Arch:
    """The real configs of SD 3.5 `variant` (`size="full"`) or their narrow test version."""
    if variant not in ("medium", "large"):
        raise ValueError(f"variant={variant!r}: use 'medium' or 'large'")
    if size not in ("full", "test"):
        raise ValueError(f"size={size!r}: use 'full' or 'test'")
    transformer = SD35_MEDIUM_TRANSFORMER if variant == "medium" else SD35_LARGE_TRANSFORMER
    arch = SD3Arch(transformer=dict(transformer), vae=flow_vae_config("full", SD35_VAE_SCALING, SD35_VAE_SHIFT),
                   text_encoder=dict(SD_FULL["sd15"].text_encoder), text_encoder_2=dict(CLIP_BIGG),
                   text_encoder_3=t5_config("full"), scheduler=dict(SD35_SCHEDULER))
    if size == "full":
        return arch
    crop_ratio = transformer["pos_embed_max_size"] / transformer["sample_size"]
    test_transformer = {**transformer, **_TEST_TRANSFORMER,
                        "pos_embed_max_size": int(crop_ratio * _TEST_TRANSFORMER["sample_size"])}
    if "dual_attention_layers" in transformer:
        test_transformer["dual_attention_layers"] = [0]  # the first half of the blocks, as 0-12 of 24
    return replace(arch, transformer=test_transformer, vae=flow_vae_config("test", SD35_VAE_SCALING, SD35_VAE_SHIFT),
                   text_encoder={**arch.text_encoder, **_TEST_CLIP_1}, text_encoder_2={**arch.text_encoder_2, **_TEST_CLIP_2},
                   text_encoder_3={**t5_config("test"), **_TEST_T5})


def build_sd3(out_dir: Path, variant: Variant = "medium", size: Size = "test", seed: int = 0) -> SD3Arch:
    """Write a random-weight SD 3.5 `variant` of `size` into `out_dir` (diffusers layout);
    `StableDiffusion3Pipeline.from_pretrained(out_dir)` loads it. The caller's torch RNG is untouched."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    arch = sd3_arch(variant, size)
    out_dir = Path(out_dir)
    tokenizer = write_clip_tokenizer(out_dir / "tokenizer", CLIP_MAX_LENGTH, EOS_TOKEN)
    # OpenCLIP's tokenizer pads with "!" (id 0), as in SDXL.
    tokenizer_2 = write_clip_tokenizer(out_dir / "tokenizer_2", CLIP_MAX_LENGTH, "!")
    tokenizer_3 = write_t5_tokenizer(out_dir / "tokenizer_3", T5_MAX_LENGTH)
    test = size == "test"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = random_clip_text_encoder(arch.text_encoder, tokenizer, shrink_vocab=test,
                                                model_class=CLIPTextModelWithProjection)
        torch.manual_seed(seed + 1)
        text_encoder_2 = random_clip_text_encoder(arch.text_encoder_2, tokenizer_2, shrink_vocab=test,
                                                  model_class=CLIPTextModelWithProjection)
        torch.manual_seed(seed + 2)
        text_encoder_3 = random_t5_encoder({**arch.text_encoder_3, "vocab_size": len(tokenizer_3)}
                                           if test else arch.text_encoder_3)
        torch.manual_seed(seed + 3)
        vae = AutoencoderKL(**arch.vae)
        torch.manual_seed(seed + 4)
        transformer = SD3Transformer2DModel(**arch.transformer)
    components = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
                  "text_encoder_3": text_encoder_3, "scheduler": FlowMatchEulerDiscreteScheduler(**arch.scheduler),
                  "tokenizer": ("transformers", "CLIPTokenizer"), "tokenizer_2": ("transformers", "CLIPTokenizer"),
                  "tokenizer_3": ("transformers", "T5TokenizerFast"), "feature_extractor": None, "image_encoder": None}
    save_diffusers_folder(out_dir, "StableDiffusion3Pipeline", components)
    return arch


def count_parameters(variant: Variant = "medium", size: Size = "full") -> dict[str, int]:
    """Parameters of each SD 3.5 model, built on the meta device."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    arch = sd3_arch(variant, size)
    return {"transformer": meta_parameters(lambda: SD3Transformer2DModel(**arch.transformer)),
            "vae": meta_parameters(lambda: AutoencoderKL(**arch.vae)),
            "text_encoder": meta_parameters(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_encoder))),
            "text_encoder_2": meta_parameters(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_encoder_2))),
            "text_encoder_3": meta_parameters(lambda: random_t5_encoder(arch.text_encoder_3))}
