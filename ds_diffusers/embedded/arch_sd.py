"""Stable Diffusion 1.5 / 2.x architectures with random weights, in the diffusers folder layout.

The configs are the real checkpoints' `config.json` values (runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-2-1, the 768-v model). `size="full"` builds them exactly (the SD 1.5
UNet has 859,520,964 parameters); `size="test"` shrinks only widths and layer counts, keeping every
block type and option, so tests meet what users' checkpoints do (VAE mid-block attention, four VAE
levels, `use_linear_projection`, per-block heads, `quick_gelu` vs `gelu`, v-prediction) in seconds.

SD 2.x's text features: the SD 2 pipelines condition on the penultimate layer of OpenCLIP ViT-H
(24 layers), followed by the final layer norm. The diffusers export of SD 2 drops the last layer
(`num_hidden_layers: 23`), so `last_hidden_state` is exactly that and the pipeline, the trainer and
the sampler all take output [0] with no clip-skip logic. These builders mirror it: the SD 2 encoder
config is already the truncated one.

The helpers `write_clip_tokenizer`, `random_clip_text_encoder` and `save_diffusers_folder` are
family-neutral (the SDXL builder uses them too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ds_diffusers.embedded.tokenizer import EOS_TOKEN, write_tokenizer

Family = Literal["sd15", "sd2"]
Size = Literal["full", "test"]
CLIP_MAX_LENGTH = 77
# Every SD 1.x/2.x VAE: latents are scaled by this before the UNet sees them.
SD_VAE_SCALING_FACTOR = 0.18215
# The test models' image size: four VAE levels downsample by 8, so 64 px gives 8x8 latents.
TEST_RESOLUTION = 64


@dataclass(frozen=True)
class SDArch:
    """Config dicts of one Stable Diffusion family at one size; `build_sd` turns them into a folder."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler_class: str
    scheduler: dict[str, Any]
    # SD 1.x's tokenizer pads with the end-of-text token; SD 2.x's (OpenCLIP) pads with "!" (id 0).
    pad_token: str
    pipeline_class: str = "StableDiffusionPipeline"
    model_index_extra: dict[str, Any] = field(default_factory=lambda: {"requires_safety_checker": False})


_SD_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": SD_VAE_SCALING_FACTOR,
}
_SD_UNET_COMMON = {
    "act_fn": "silu", "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
}
_SD_SCHEDULER_COMMON = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
# The real encoders' legacy special-token ids: eos_token_id 2 makes CLIP pool at argmax(input_ids),
# which is the end-of-text token in the real vocabulary and in ours (it has the highest id).
_CLIP_TEXT_COMMON = {
    "max_position_embeddings": CLIP_MAX_LENGTH, "vocab_size": 49408, "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
    "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 2,
    "pad_token_id": 1,
}

FULL: dict[str, SDArch] = {
    "sd15": SDArch(
        unet={**_SD_UNET_COMMON, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
        vae=_SD_VAE,
        # openai/clip-vit-large-patch14's text tower.
        text_encoder={**_CLIP_TEXT_COMMON, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
                      "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768},
        scheduler_class="PNDMScheduler",
        scheduler={**_SD_SCHEDULER_COMMON, "prediction_type": "epsilon"},
        pad_token=EOS_TOKEN,
    ),
    "sd2": SDArch(
        # diffusers' legacy name: attention_head_dim is read as the number of heads (head dim 64 everywhere).
        unet={**_SD_UNET_COMMON, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
              "use_linear_projection": True, "upcast_attention": True, "dual_cross_attention": False,
              "only_cross_attention": False, "num_class_embeds": None},
        vae={**_SD_VAE, "sample_size": 768},
        # OpenCLIP ViT-H/14's text tower without its last layer (see the module docstring).
        text_encoder={**_CLIP_TEXT_COMMON, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512},
        scheduler_class="DDIMScheduler",
        scheduler={**_SD_SCHEDULER_COMMON, "prediction_type": "v_prediction"},
        pad_token="!",
    ),
}

_TEST_CHANNELS = [32, 64, 64, 64]
_TEST_VAE = {"block_out_channels": _TEST_CHANNELS, "sample_size": TEST_RESOLUTION}
# Test widths: channels, text width and text depth only. The text head counts stay the real ones
# (12 and 16, head dim 4); SD 2's per-block head counts keep the real rule heads = channels / head_dim
# (64 at full size, 8 here), which is how [5, 10, 20, 20] arises from [320, 640, 1280, 1280].
_TEST_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": {
        "unet": {"block_out_channels": _TEST_CHANNELS, "cross_attention_dim": 48, "sample_size": TEST_RESOLUTION // 8},
        "vae": _TEST_VAE,
        "text_encoder": {"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 2, "projection_dim": 48},
    },
    "sd2": {
        "unet": {"block_out_channels": _TEST_CHANNELS, "attention_head_dim": [c // 8 for c in _TEST_CHANNELS],
                 "cross_attention_dim": 64, "sample_size": TEST_RESOLUTION // 8},
        "vae": _TEST_VAE,
        "text_encoder": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "projection_dim": 32},
    },
}


def sd_arch(family: Family, size: Size = "test") -> SDArch:
    """The real configs of `family` (`size="full"`) or their narrow test version."""
    if family not in FULL:
        raise ValueError(f"family={family!r}: use one of {sorted(FULL)}")
    arch = FULL[family]
    if size == "full":
        return arch
    if size != "test":
        raise ValueError(f"size={size!r}: use 'full' or 'test'")
    overrides = _TEST_OVERRIDES[family]
    return replace(arch, unet={**arch.unet, **overrides["unet"]}, vae={**arch.vae, **overrides["vae"]},
                   text_encoder={**arch.text_encoder, **overrides["text_encoder"]})


def write_clip_tokenizer(out_dir: Path, model_max_length: int = CLIP_MAX_LENGTH, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """The project's offline CLIP BPE tokenizer (`embedded.tokenizer`) with the given padding token."""
    write_tokenizer(out_dir, model_max_length)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        settings = json.loads((out_dir / name).read_text())
        settings["pad_token"] = pad_token
        (out_dir / name).write_text(json.dumps(settings, indent=2) + "\n")
    return CLIPTokenizer.from_pretrained(out_dir)


def random_clip_text_encoder(config: dict[str, Any], tokenizer: CLIPTokenizer, *, shrink_vocab: bool,
                             model_class: type = CLIPTextModel) -> torch.nn.Module:
    """A randomly initialised CLIP text tower; `shrink_vocab` sizes the embedding to the small tokenizer."""
    settings = dict(config)
    if shrink_vocab:
        settings["vocab_size"] = len(tokenizer)
    elif settings["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size={settings['vocab_size']} is smaller than the tokenizer's {len(tokenizer)} tokens")
    return model_class(CLIPTextConfig(**settings))


def save_diffusers_folder(out_dir: Path, pipeline_class: str, components: dict[str, Any],
                          extra: dict[str, Any] | None = None) -> None:
    """`save_pretrained` each component into its subfolder and write `model_index.json` naming them,
    as `DiffusionPipeline.save_pretrained` lays it out (a `None` component is recorded as absent)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__, **(extra or {})}
    for name, component in sorted(components.items()):
        if component is None:
            index[name] = [None, None]
            continue
        if not (out_dir / name).is_dir():  # a part the caller wrote in place (tokenizer, scheduler)
            component.save_pretrained(out_dir / name)
        index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_sd(out_dir: Path, family: Family = "sd15", size: Size = "test", seed: int = 0) -> SDArch:
    """Write a random-weight `family` model of `size` into `out_dir` (diffusers layout). The result
    loads with `StableDiffusionPipeline.from_pretrained(out_dir)`; the caller's torch RNG is untouched."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers import DDIMScheduler, PNDMScheduler

    arch = sd_arch(family, size)
    out_dir = Path(out_dir)
    tokenizer = write_clip_tokenizer(out_dir / "tokenizer", CLIP_MAX_LENGTH, arch.pad_token)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = random_clip_text_encoder(arch.text_encoder, tokenizer, shrink_vocab=size == "test")
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**arch.vae)
        torch.manual_seed(seed + 2)
        unet = UNet2DConditionModel(**arch.unet)
    scheduler_class = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler}[arch.scheduler_class]
    scheduler = scheduler_class.from_config(arch.scheduler)
    # The real file as it is, keys the class ignores included: the trainer reads it as a DDPMScheduler,
    # whose defaults differ (clip_sample), so those keys matter.
    (out_dir / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler_file = {"_class_name": arch.scheduler_class, "_diffusers_version": diffusers.__version__, **arch.scheduler}
    (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_file, indent=2) + "\n")
    components = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler,
                  "safety_checker": None, "feature_extractor": None, "image_encoder": None}
    save_diffusers_folder(out_dir, arch.pipeline_class, components, arch.model_index_extra)
    return arch


def count_unet_parameters(family: Family, size: Size = "full") -> int:
    """Parameters of the family's UNet, built on the meta device (no memory, no init time)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd_arch(family, size).unet)
    return sum(p.numel() for p in unet.parameters())
