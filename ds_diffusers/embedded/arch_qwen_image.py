"""Qwen-Image (the 20B-class model) with random weights, in the diffusers folder layout.

Why Qwen-Image and not FLUX.2: the installed diffusers (0.42.1) has both pipelines, but Qwen-Image's
transformer is the 20B class itself (20,430,401,088 parameters, published "20B MMDiT") where FLUX.2
[dev] is 32.2B; its pipeline family is the most complete there (text-to-image, img2img, inpaint,
edit, edit-plus, ControlNet, and `QwenImageLoraLoaderMixin` for LoRA); and its weights are Apache-2.0,
so users may fine-tune and ship them (FLUX.2 [dev]: non-commercial licence).

The configs are Qwen/Qwen-Image's `config.json` values: transformer/ (QwenImageTransformer2DModel:
60 dual-stream blocks, 24 heads of 128, rotary axes 16/56/56, 2x2 patches of 16 latent channels),
vae/ (AutoencoderKLQwenImage, the Wan-style causal 3D VAE with per-channel latent mean/std),
text_encoder/ (Qwen2.5-VL-7B-Instruct, 8,292,166,656 parameters; its last hidden state is the
prompt feature, after the chat template's first 34 tokens are dropped), tokenizer/ (Qwen2 byte-level
BPE), scheduler/ (flow matching with exponential dynamic shift). `size="test"` shrinks widths and
depths only, keeping grouped-query attention, multimodal rotary sections, the vision tower, the
causal VAE's temporal downsampling; the tokenizer is byte-level BPE with no merges (every byte one
token, so the template is well over 34 tokens) plus the chat special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from ds_diffusers.embedded.arch_flow import meta_parameters
from ds_diffusers.embedded.arch_sd import save_diffusers_folder
from ds_diffusers.embedded.tokenizer import bytes_to_unicode

Size = Literal["full", "test"]
# Qwen/Qwen-Image transformer/config.json.
QWEN_IMAGE_TRANSFORMER = {
    "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": False, "in_channels": 64,
    "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 60, "out_channels": 16, "patch_size": 2,
}
QWEN_IMAGE_PARAMETERS = 20_430_401_088
# Qwen/Qwen-Image vae/config.json (latents_mean / latents_std are the class defaults, the same values).
QWEN_IMAGE_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                  "temperal_downsample": [False, True, True], "dropout": 0.0}
# Qwen/Qwen-Image scheduler/scheduler_config.json.
QWEN_IMAGE_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192, "max_shift": 0.9,
    "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02, "stochastic_sampling": False,
    "time_shift_type": "exponential", "use_beta_sigmas": False, "use_dynamic_shifting": True,
    "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
# Qwen/Qwen-Image text_encoder/config.json (Qwen2.5-VL-7B-Instruct).
QWEN25_VL_7B_TEXT = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
QWEN25_VL_7B_VISION = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "in_chans": 3, "hidden_act": "silu",
}
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_MAX_LENGTH = 131072

# Test size: head dim 128 -> 16 (rotary axes and mrope sections in proportion), 28 query / 4 KV heads
# -> 4 / 2, depths 60/28/32 -> 2.
_TEST_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 4096,
              "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
_TEST_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                "fullatt_block_indexes": [1]}
_TEST_TRANSFORMER = {"attention_head_dim": 16, "axes_dims_rope": [4, 6, 6], "num_attention_heads": 2, "num_layers": 2,
                     "joint_attention_dim": _TEST_TEXT["hidden_size"]}
_TEST_VAE = {"base_dim": 16, "num_res_blocks": 1}


@dataclass(frozen=True)
class QwenImageArch:
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_config: dict[str, Any]
    vision_config: dict[str, Any]
    scheduler: dict[str, Any]


def qwen_image_arch(size: Size = "test") -> QwenImageArch:
    """The real configs of Qwen-Image (`size="full"`) or their narrow test version."""
    if size not in ("full", "test"):
        raise ValueError(f"size={size!r}: use 'full' or 'test'")
    arch = QwenImageArch(dict(QWEN_IMAGE_TRANSFORMER), dict(QWEN_IMAGE_VAE), dict(QWEN25_VL_7B_TEXT),
                         dict(QWEN25_VL_7B_VISION), dict(QWEN_IMAGE_SCHEDULER))
    if size == "full":
        return arch
    return replace(arch, transformer={**arch.transformer, **_TEST_TRANSFORMER}, vae={**arch.vae, **_TEST_VAE},
                   text_config={**arch.text_config, **_TEST_TEXT}, vision_config={**arch.vision_config, **_TEST_VISION})


def _text_encoder(arch: QwenImageArch, tokenizer: Any = None) -> torch.nn.Module:
    """Qwen2.5-VL; with `tokenizer`, its vocabulary and special-token ids replace the real ones."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(arch.text_config)
    if tokenizer is not None:
        text.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.convert_tokens_to_ids(CHAT_TOKENS[0]),
                    eos_token_id=tokenizer.convert_tokens_to_ids(CHAT_TOKENS[2]))
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=arch.vision_config))


def write_qwen_tokenizer(out_dir: Path) -> Any:
    """A byte-level BPE tokenizer in Qwen2's format: the 256 byte symbols, no merges, the chat tokens."""
    from transformers import Qwen2Tokenizer

    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=TOKENIZER_MAX_LENGTH)
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS[1:])})
    tokenizer.add_special_tokens({"pad_token": CHAT_TOKENS[0], "eos_token": CHAT_TOKENS[0]})
    tokenizer.save_pretrained(out_dir)
    return Qwen2Tokenizer.from_pretrained(out_dir)


def build_qwen_image(out_dir: Path, size: Size = "test", seed: int = 0) -> QwenImageArch:
    """Write a random-weight Qwen-Image of `size` into `out_dir` (diffusers layout);
    `QwenImagePipeline.from_pretrained(out_dir)` loads it. The caller's torch RNG is untouched."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    arch = qwen_image_arch(size)
    out_dir = Path(out_dir)
    tokenizer = write_qwen_tokenizer(out_dir / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _text_encoder(arch, tokenizer if size == "test" else None)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(**arch.vae)
        torch.manual_seed(seed + 2)
        transformer = QwenImageTransformer2DModel(**arch.transformer)
    components = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
                  "scheduler": FlowMatchEulerDiscreteScheduler(**arch.scheduler),
                  "tokenizer": ("transformers", "Qwen2Tokenizer")}
    save_diffusers_folder(out_dir, "QwenImagePipeline", components)
    return arch


def count_parameters(size: Size = "full") -> dict[str, int]:
    """Parameters of each Qwen-Image model, built on the meta device."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    arch = qwen_image_arch(size)
    return {"transformer": meta_parameters(lambda: QwenImageTransformer2DModel(**arch.transformer)),
            "vae": meta_parameters(lambda: AutoencoderKLQwenImage(**arch.vae)),
            "text_encoder": meta_parameters(lambda: _text_encoder(arch))}
