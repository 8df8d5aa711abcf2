"""The text pre-pass (data/text_prepass.py) in one in-process rank on the FLUX.1-shaped test model: a
covered run fills the text and prompt caches and frees CLIP and T5, a second run never loads them, an
uncovered one keeps them, and `text_encoder_zero3` (encoders partitioned, ZeRO-3 inference) stores
the same embeddings as the replicated encoders. (Two processes: tests/test_text_prepass_integration.py.)"""

from __future__ import annotations

import datasets
import pytest
import torch
from safetensors.torch import load_file

from ds_diffusers.config import load_config
from ds_diffusers.data import load_train_dataset
from ds_diffusers.data.text_prepass import TextSources, extra_prompts, prepare_text
from ds_diffusers.engine import is_zero3_param
from ds_diffusers.errors import ConfigError
from ds_diffusers.models import load_frozen_components, load_text_encoders, tokenize
from tests.helpers import REPO, SINGLE

PROMPTS = ["a red circle", "a blue square"]


def prepass_cfg(flux_model, tiny_assets, cache_dir, *overrides: str):
    return load_config(REPO / "cfg/default.json", [
        f"pretrained_model_name_or_path={flux_model}", f"dataset_dir={tiny_assets.dataset_dir}", f"cache_dir={cache_dir}",
        "resolution=64", "train_micro_batch_size_per_gpu=3", "cache_text_embeddings=true",
        f"validation_prompts={PROMPTS!r}".replace("'", '"'), *overrides])


def sources(tiny_assets) -> TextSources:
    dataset = load_train_dataset(tiny_assets.dataset_dir, imagefolder=False)
    held_out = datasets.Dataset.from_dict({"text": ["a held-out green triangle"]})
    return TextSources(dataset.select(range(10)), "text", held_out)


def run_prepass(cfg, text_sources, lines=None):
    frozen = load_frozen_components(cfg.pretrained_model_name_or_path, torch.device("cpu"), torch.float32, None,
                                    with_text_encoders=False)
    assert frozen.text_encoders == {}  # tokenizers only
    return frozen, prepare_text(cfg, text_sources, frozen, SINGLE, log=(lines if lines is not None else []).append)


def reference_outputs(flux_model, captions: list[str]) -> dict[str, torch.Tensor]:
    frozen = load_frozen_components(str(flux_model), torch.device("cpu"), torch.float32, None)
    return frozen.encode_text(tokenize(frozen.tokenizers, captions))


def test_extra_prompts_hold_validation_prompts_the_empty_prompt_and_held_out_captions(flux_model, tiny_assets, tmp_path):
    cfg = prepass_cfg(flux_model, tiny_assets, tmp_path)
    assert extra_prompts(cfg, sources(tiny_assets)) == ["", "a blue square", "a held-out green triangle", "a red circle"]


def test_covered_run_frees_the_encoders_then_never_loads_them(flux_model, tiny_assets, tmp_path, one_rank):
    cfg, text_sources = prepass_cfg(flux_model, tiny_assets, tmp_path), sources(tiny_assets)
    lines: list[str] = []
    frozen, text = run_prepass(cfg, text_sources, lines)
    assert frozen.text_encoders == {} and type(frozen.tokenizer_2).__name__ == "T5Tokenizer"  # = T5TokenizerFast in transformers 5
    assert text.line.startswith("text encoders freed after the pre-pass (text_encoder (CLIPTextModel), "
                                "text_encoder_2 (T5EncoderModel): ") and "0 bytes held in training" in text.line
    assert sum("encoded" in line for line in lines) == 2  # the text cache and the prompt cache
    prompts = ["", *PROMPTS, "a held-out green triangle"]
    want = reference_outputs(flux_model, prompts)
    for index, prompt in enumerate(prompts):
        got = text.prompt_cache.embeddings(prompt)
        assert torch.equal(got["encoder_hidden_states"], want["encoder_hidden_states"][index])
        assert torch.equal(got["pooled_projections"], want["pooled_projections"][index])
    assert "" in text.text_cache.index  # caption dropout's empty prompt

    frozen, again = run_prepass(cfg, text_sources)
    assert again.line.startswith("text encoders never loaded") and frozen.text_encoders == {}
    assert again.prompt_cache.store.folder == text.prompt_cache.store.folder


@pytest.mark.parametrize("overrides, reason", [(("cache_text_embeddings=false",), "no text cache: cache_text_embeddings is false"),
                                               ((), "WebDataset shards")])
def test_uncovered_run_keeps_the_encoders(flux_model, tiny_assets, tmp_path, overrides, reason):
    cfg = prepass_cfg(flux_model, tiny_assets, tmp_path, *overrides)
    text_sources = sources(tiny_assets) if overrides else TextSources(None, "")
    frozen, text = run_prepass(cfg, text_sources)
    assert set(frozen.text_encoders) == {"text_encoder", "text_encoder_2"}
    assert text.text_cache is None and text.prompt_cache is None
    assert text.line.startswith(f"text encoders kept for training ({reason}")
    assert text.line.endswith("MB of weights held by each process in training")
    with pytest.raises(ConfigError) as info:
        run_prepass(prepass_cfg(flux_model, tiny_assets, tmp_path, *overrides, "text_encoder_zero3=true"), text_sources)
    assert info.value.field == "text_encoder_zero3"


def test_zero3_encoders_are_partitioned_and_store_the_replicated_embeddings(flux_model, tiny_assets, tmp_path, one_rank):
    from ds_diffusers.data.text_prepass import zero3_encoder_config

    cfg = prepass_cfg(flux_model, tiny_assets, tmp_path / "zero3", "text_encoder_zero3=true")
    parts = load_text_encoders(str(flux_model), torch.device("cpu"), torch.float32, None, zero3_encoder_config(cfg))
    assert all(is_zero3_param(p) and p.numel() == 0 for p in parts["text_encoder_2"].parameters())
    assert len(parts["encoder_engines"]) == 2
    del parts

    text_sources = sources(tiny_assets)
    _, partitioned = run_prepass(cfg, text_sources)
    assert "partitioned by ZeRO-3" in partitioned.line
    _, replicated = run_prepass(prepass_cfg(flux_model, tiny_assets, tmp_path / "plain"), text_sources)
    for ours, theirs in ((partitioned.text_cache, replicated.text_cache), (partitioned.prompt_cache, replicated.prompt_cache)):
        assert ours.index == theirs.index
        for shard in ours.store.folder.glob("shard-*.safetensors"):
            mine, other = load_file(str(shard)), load_file(str(theirs.store.folder / shard.name))
            assert mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine)


@pytest.mark.parametrize("model", ["tiny_assets", "sdxl_model", "flux_model", "sd3_model", "qwen_image_model"])
def test_pipelines_draw_the_same_images_from_stored_embeddings(model, request):
    """What validation draws with the encoders freed (`ModelFamily.embedding_inputs`) equals what the
    pipeline draws encoding the prompt itself, guidance (and its empty negative) included. SD 3.5 stores
    the T5 length it trains with (77 tokens), so its pipeline encodes at that length here; Qwen-Image's
    stored sequence is padded to 512 tokens with its mask, the pipeline's own is not padded."""
    from ds_diffusers.families import detect_family
    from ds_diffusers.families.sd3 import T5_SEQUENCE_LENGTH
    from ds_diffusers.generation import build_pipeline, generate_images

    fixture = request.getfixturevalue(model)
    model_dir = str(getattr(fixture, "model_dir", fixture))
    frozen = load_frozen_components(model_dir, torch.device("cpu"), torch.float32, None)
    denoiser = detect_family(model_dir).load_denoiser(model_dir, None, 0, None)
    pipe = build_pipeline(frozen, denoiser)
    if model == "sd3_model":
        encode_prompt = pipe.encode_prompt
        pipe.encode_prompt = lambda *args, **kwargs: encode_prompt(*args, **{**kwargs, "max_sequence_length": T5_SEQUENCE_LENGTH})
    outputs = frozen.encode_text(tokenize(frozen.tokenizers, ["a red circle", ""]))
    embeddings = tuple({name: tensor[index] for name, tensor in outputs.items()} for index in (0, 1))
    common = dict(seed=1, num_images=2, resolution=64, num_inference_steps=2, guidance_scale=4.0, output_type="np")
    want = generate_images(pipe, "a red circle", 0, **common)
    got = generate_images(pipe, "a red circle", 0, embeddings=embeddings, **common)
    assert want.std() > 0
    assert abs(want - got).max() < 1e-5


def test_held_out_loss_reads_its_captions_from_the_prompt_cache(tiny_assets, tmp_path, one_rank):
    """With the encoders freed, the held-out loss takes its rows' captions from the pre-pass's prompt
    cache and gives the loss computed with the encoders."""
    from diffusers import UNet2DConditionModel

    from ds_diffusers.distributed import DistInfo
    from ds_diffusers.validation_loss import HeldOutLoss
    from tests.helpers import in_memory_dataset

    held_out = in_memory_dataset(3)
    cfg = prepass_cfg(tiny_assets.model_dir, tiny_assets, tmp_path)
    freed, text = run_prepass(cfg, TextSources(in_memory_dataset(6), "text", held_out))
    assert freed.text_encoders == {} and text.prompt_cache is not None
    kept = load_frozen_components(str(tiny_assets.model_dir), torch.device("cpu"), torch.float32, None)
    unet = UNet2DConditionModel.from_pretrained(tiny_assets.model_dir, subfolder="unet").eval()

    def forward(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        return unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]

    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    common = dict(resolution=32, seed=3, num_timesteps=4)
    want = HeldOutLoss(held_out, "image", "text", kept, dist, **common)(forward, torch.float32)
    got = HeldOutLoss(held_out, "image", "text", freed, dist, text_cache=text.prompt_cache, **common)(forward, torch.float32)
    assert got == pytest.approx(want, rel=1e-6) and want > 0


def test_sd3_frees_its_three_encoders_and_a_family_without_embedding_inputs_keeps_them_to_draw(sd3_model, tiny_assets,
                                                                                                tmp_path, one_rank, monkeypatch):
    """SD 3.5 draws its validation images from the prompt cache: its three encoders (T5 among them) are
    freed like FLUX.1's. A family that cannot (`samples_from_embeddings` false) keeps them when the run
    draws validation images, and frees them when it does not."""
    from ds_diffusers.families.sd3 import StableDiffusion3

    drawing = prepass_cfg(sd3_model, tiny_assets, tmp_path / "a", "validation_steps=5")
    frozen, text = run_prepass(drawing, sources(tiny_assets))
    assert text.line.startswith("text encoders freed after the pre-pass") and frozen.text_encoders == {}
    assert type(frozen.tokenizer_3).__name__.startswith("T5Tokenizer")  # the tokenizers stay
    assert text.prompt_cache.embeddings("")["encoder_hidden_states"].shape[0] == 77 + 77  # CLIP + T5 tokens

    monkeypatch.setattr(StableDiffusion3, "samples_from_embeddings", False)
    frozen, text = run_prepass(drawing, sources(tiny_assets))
    assert text.line.startswith("text encoders kept for training (Stable Diffusion 3.5 validation encodes its prompts")
    assert set(frozen.text_encoders) == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    frozen, text = run_prepass(prepass_cfg(sd3_model, tiny_assets, tmp_path / "b", "validation_steps=0"), sources(tiny_assets))
    assert text.line.startswith("text encoders freed after the pre-pass") and frozen.text_encoders == {}
