"""Parts shared by the flow-matching transformer families (Flux.1, SD 3.5, Qwen-Image) at any size.

Holds the 16-channel VAE both Flux.1 and SD 3.5 ship (one config, their own shift and scale), the
T5 v1.1 XXL encoder config both use, an offline T5 tokenizer, and parameter counting on the meta
device (no memory, no init time), which is how the full-size models are checked against their
published sizes without ever holding their weights.

The T5 tokenizer: T5's real tokenizer is a sentencepiece unigram model (32,100 pieces). Ours is a
unigram model built in memory from a piece list with the `tokenizers` library (transformers'
`T5Tokenizer(vocab=[(piece, score), ...])`, which wires the same Metaspace pre-tokenizer and `</s>`
post-processor as the real one): ids 0/1/2 are `<pad>`/`</s>`/`<unk>` as in T5, then the word
boundary piece, single characters (so any ASCII prompt tokenizes) and one piece per word of the
project's captions. No sentencepiece training, no download; `save_pretrained` writes tokenizer.json.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Callable

import torch

from ds_diffusers.embedded.tokenizer import corpus_words

# T5's special tokens at their real ids 0, 1, 2.
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"

# google/t5-v1_1-xxl as shipped in black-forest-labs/FLUX.1-dev text_encoder_2/config.json and
# stabilityai/stable-diffusion-3.5-large text_encoder_3/config.json (T5EncoderModel, 4,762,310,656
# parameters).
T5_XXL = {
    "d_ff": 10240, "d_kv": 64, "d_model": 4096, "dropout_rate": 0.1, "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new", "is_gated_act": True, "initializer_factor": 1.0, "layer_norm_epsilon": 1e-6,
    "num_heads": 64, "num_layers": 24, "num_decoder_layers": 24, "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "vocab_size": 32128,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "is_encoder_decoder": True,
}
# Test size: the width, heads and depth shrink; gated GELU, relative-position buckets and the
# d_ff / d_model ratio of 2.5 stay.
T5_TEST = {"d_model": 64, "d_ff": 160, "d_kv": 16, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2}

# The VAE of FLUX.1-dev vae/config.json and stable-diffusion-3.5-large vae/config.json: the SD VAE
# layout with 16 latent channels and no quant convs; they differ only in shift and scale.
FLOW_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "force_upcast": True,
    "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
}
# Four levels as the real one (latents 1/8 of the image), 32 groups kept: channels are multiples of 32.
FLOW_VAE_TEST = {"block_out_channels": [32, 64, 64, 64], "sample_size": 64}
# The test models' image size: 64 px is 8x8 latents, 4x4 tokens after 2x2 patching.
TEST_RESOLUTION = 64


def t5_config(size: str, vocab_size: int | None = None) -> dict[str, Any]:
    """T5 v1.1 XXL (`size="full"`) or its narrow test version with the small tokenizer's vocabulary."""
    if size == "full":
        return dict(T5_XXL)
    return {**T5_XXL, **T5_TEST, "vocab_size": vocab_size or T5_XXL["vocab_size"]}


def flow_vae_config(size: str, scaling_factor: float, shift_factor: float) -> dict[str, Any]:
    base = dict(FLOW_VAE) if size == "full" else {**FLOW_VAE, **FLOW_VAE_TEST}
    return {**base, "scaling_factor": scaling_factor, "shift_factor": shift_factor}


def write_t5_tokenizer(out_dir: Path, model_max_length: int = 512) -> Any:
    """Write a small T5 unigram tokenizer (module docstring) that `T5TokenizerFast.from_pretrained` loads."""
    from transformers import T5TokenizerFast

    characters = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    # Scores are log-probabilities: whole words beat their spelling, the bare boundary is rare.
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in characters] + [("\u2581" + word, -1.0) for word in corpus_words()]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(out_dir)
    return T5TokenizerFast.from_pretrained(out_dir)


def random_t5_encoder(config: dict[str, Any]) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**config))


def meta_parameters(build: Callable[[], torch.nn.Module]) -> int:
    """Parameters of the module `build()` makes, built on the meta device."""
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())

