"""FLUX.1 on the FLUX.1 [dev]-shaped test model (`embedded.arch_flux`): detection, conditioning equal to
FluxPipeline.encode_prompt, the 2x2 packing and image ids equal to the pipeline's, shifted and scaled
latents, the transformer called as diffusers' DreamBooth Flux script calls it (guidance 3.5, σ), the
default LoRA targets, and the flow objective in the loop. Launcher runs: tests/test_flux_integration.py."""

from __future__ import annotations

import json

import pytest
import torch

from ds_diffusers.config import validate_dict
from ds_diffusers.config.checks import check_lora_targets
from ds_diffusers.errors import ConfigError
from ds_diffusers.families import detect_family
from ds_diffusers.families.flux import (FLUX_LORA_TARGETS, TRAINING_GUIDANCE, latent_image_ids, pack_latents,
                                        unpack_latents)
from ds_diffusers.models import build_unet, load_frozen_components, tokenize
from ds_diffusers.objective import encode_batch
from tests.helpers import REPO, with_changes

CAPTIONS = ["a red circle", "a small blue square on black"]


@pytest.fixture(scope="module")
def frozen(flux_model):
    return load_frozen_components(str(flux_model), torch.device("cpu"), torch.float32, None)


@pytest.fixture(scope="module")
def pipeline(flux_model):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(flux_model)


def test_flux_folder_is_detected_and_loads_its_parts(flux_model, frozen):
    family = detect_family(flux_model)
    assert family.name == "flux" and family.objective == "flow" and family.denoiser_folder == "transformer"
    assert type(frozen.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert type(frozen.text_encoder_2).__name__ == "T5EncoderModel" and not frozen.text_encoder_2.training
    assert {name: ids.shape[1] for name, ids in tokenize(frozen.tokenizers, CAPTIONS).items()} == {"input_ids": 77,
                                                                                                    "input_ids_2": 512}


def test_detection_reads_the_pipeline_class(tmp_path, flux_model):
    index = json.loads((flux_model / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert detect_family(tmp_path).name == "flux"
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    assert detect_family(tmp_path).name == "sd3"  # not claimed by Flux


def test_conditioning_equals_flux_pipeline_encode_prompt(frozen, pipeline):
    text = frozen.encode_text(tokenize(frozen.tokenizers, CAPTIONS))
    with torch.no_grad():  # as FluxPipeline.__call__ runs it (SDPA picks other CPU kernels under autograd)
        prompt_embeds, pooled_prompt_embeds, text_ids = pipeline.encode_prompt(CAPTIONS, None, device="cpu")
    assert torch.equal(text["encoder_hidden_states"], prompt_embeds)
    assert torch.equal(text["pooled_projections"], pooled_prompt_embeds)
    assert prompt_embeds.shape[1] == 512 and not text_ids.any()


def test_packing_and_image_ids_equal_the_pipeline(pipeline):
    latents = torch.randn(2, 16, 8, 6)
    packed = pack_latents(latents)
    assert torch.equal(packed, pipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), latents)
    assert torch.equal(pipeline._unpack_latents(packed, 64, 48, pipeline.vae_scale_factor), latents)
    assert torch.equal(latent_image_ids(8, 6, torch.device("cpu"), torch.float32),
                       pipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


def test_latents_are_shifted_then_scaled(flux_model, frozen):
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    posterior = frozen.vae.encode(pixels).latent_dist
    generator = torch.Generator().manual_seed(0)
    encoded = encode_batch(frozen, {"pixel_values": pixels, **tokenize(frozen.tokenizers, CAPTIONS)}, generator)
    sample = posterior.sample(torch.Generator().manual_seed(0))
    config = frozen.vae.config
    assert config.shift_factor != 0 and config.scaling_factor != 1
    assert torch.allclose(encoded.latents, (sample - config.shift_factor) * config.scaling_factor)
    assert encoded.latents.shape == (2, 16, 8, 8) and set(encoded.added_cond_kwargs) == {"pooled_projections"}


def test_transformer_is_called_as_the_dreambooth_script_calls_it(flux_model, frozen):
    transformer = detect_family(flux_model).load_denoiser(str(flux_model), None, 0, None).eval()
    text = frozen.encode_text(tokenize(frozen.tokenizers, CAPTIONS))
    noisy = torch.randn(2, 16, 8, 8)
    timesteps = torch.tensor([250.0, 900.0])
    forward = detect_family(flux_model).flow_forward(transformer, transformer.config, text["encoder_hidden_states"],
                                                     {"pooled_projections": text["pooled_projections"]})
    with torch.no_grad():
        ours = forward(noisy, timesteps)
        # diffusers' train_dreambooth_flux.py: packed input, σ = t / 1000, the dev guidance, zero text ids.
        reference = transformer(hidden_states=pack_latents(noisy), timestep=timesteps / 1000,
                                guidance=torch.tensor([3.5]).expand(2), pooled_projections=text["pooled_projections"],
                                encoder_hidden_states=text["encoder_hidden_states"], txt_ids=torch.zeros(512, 3),
                                img_ids=latent_image_ids(8, 8, torch.device("cpu"), torch.float32), return_dict=False)[0]
        other_guidance = transformer(hidden_states=pack_latents(noisy), timestep=timesteps / 1000,
                                     guidance=torch.tensor([1.0]).expand(2), pooled_projections=text["pooled_projections"],
                                     encoder_hidden_states=text["encoder_hidden_states"], txt_ids=torch.zeros(512, 3),
                                     img_ids=latent_image_ids(8, 8, torch.device("cpu"), torch.float32), return_dict=False)[0]
    assert TRAINING_GUIDANCE == 3.5 and transformer.config.guidance_embeds
    assert torch.equal(ours, unpack_latents(reference, 8, 8))
    assert not torch.allclose(reference, other_guidance)  # the guidance embedder does take part


def test_lora_defaults_to_the_attention_projections(flux_model, tmp_path):
    cfg = validate_dict(with_changes(pretrained_model_name_or_path=str(flux_model), use_lora={"action": True}))
    check_lora_targets(cfg)
    transformer = build_unet(cfg)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in transformer.named_parameters() if ".lora_A." in name}
    suffixes = {name.split(".", 2)[2] for name in adapted}
    assert suffixes == set(FLUX_LORA_TARGETS)  # double blocks: both streams; single blocks: q/k/v
    assert any(name.startswith("single_transformer_blocks.") for name in adapted)
    assert all(not param.requires_grad for name, param in transformer.named_parameters() if "lora_" not in name)
    bad = validate_dict(with_changes(pretrained_model_name_or_path=str(flux_model),
                                     use_lora={"action": True, "target_modules": ["attn.to_q", "attn.to_qv"]}))
    with pytest.raises(ConfigError) as info:
        check_lora_targets(bad)
    assert info.value.field == "use_lora.target_modules" and info.value.value == "attn.to_qv"


def test_hub_download_takes_the_transformer_shards_and_not_the_single_files():
    from ds_diffusers.config.hub import HubSource, files_to_download

    shards = [f"transformer/diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    repo = ["model_index.json", "flux1-dev.safetensors", "ae.safetensors", "README.md", "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors.index.json", *shards, "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
            "text_encoder_2/config.json", "text_encoder_2/model.safetensors.index.json",
            "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
            "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json",
            "scheduler/scheduler_config.json"]
    wanted = files_to_download(repo, HubSource("pretrained_model_name_or_path", "black-forest-labs/FLUX.1-dev",
                                               "pipeline", None, "revision", None))
    assert set(shards) | {"transformer/diffusion_pytorch_model.safetensors.index.json", "transformer/config.json"} <= set(wanted)
    assert "flux1-dev.safetensors" not in wanted and "ae.safetensors" not in wanted
    assert {"tokenizer_2/spiece.model", "text_encoder_2/model-00002-of-00002.safetensors"} <= set(wanted)


def test_keys_flux_cannot_honour_are_refused_in_one_line(flux_model):
    cfg = validate_dict(with_changes(pretrained_model_name_or_path=str(flux_model), prediction_type="epsilon"))
    with pytest.raises(ConfigError) as info:
        detect_family(flux_model).check_config(cfg)
    assert info.value.field == "prediction_type" and "FLUX.1" in info.value.fix
    # The held-out loss has its flow form (validation_loss.py): a held-out split is taken.
    detect_family(flux_model).check_config(validate_dict(with_changes(pretrained_model_name_or_path=str(flux_model),
                                                                      validation_split=0.1)))


def test_sampling_checks_a_flux_lora_against_the_transformer(flux_model, tmp_path):
    from ds_diffusers.export import write_lora
    from ds_diffusers.families.flux import FLUX
    from ds_diffusers.sampling.lora_targets import check_lora_targets as check_lora_file_targets

    cfg = validate_dict(with_changes(pretrained_model_name_or_path=str(flux_model), use_lora={"action": True, "rank": 4}))
    transformer = build_unet(cfg)
    adapters = {name: param.detach() for name, param in transformer.named_parameters() if param.requires_grad}
    lora_file = write_lora(transformer, adapters, tmp_path / "lora", FLUX)
    check_lora_file_targets("sample.loras[0].path", lora_file, str(flux_model / "transformer"))
    # The same file on a transformer 2x wider: the adapters' widths no longer fit.
    config = json.loads((flux_model / "transformer" / "config.json").read_text())
    wider = tmp_path / "wider"
    wider.mkdir()
    (wider / "config.json").write_text(json.dumps({**config, "attention_head_dim": 32}))
    with pytest.raises(ConfigError) as info:
        check_lora_file_targets("sample.loras[0].path", lora_file, str(wider))
    assert "transformer." in info.value.fix and "width" in info.value.fix


@pytest.mark.parametrize("preset", ["flux_lora.json", "flux_full.json"])
def test_presets_name_flux_dev_and_pass_the_family_checks(flux_model, preset):
    from ds_diffusers.config import load_config

    cfg = load_config(REPO / "cfg" / preset)
    assert cfg.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev" and cfg.resolution == 1024
    assert cfg.bf16.enabled and cfg.gradient_checkpointing and cfg.prediction_type is None and cfg.snr_gamma is None
    on_test_model = load_config(REPO / "cfg" / preset, [f"pretrained_model_name_or_path={flux_model}"])
    detect_family(flux_model).check_config(on_test_model)
    if cfg.use_lora.action:
        assert cfg.use_lora.target_modules is None and cfg.zero_optimization.stage == 2
        check_lora_targets(on_test_model)
    else:
        assert cfg.zero_optimization.stage == 3
    with pytest.raises(ConfigError) as info:
        detect_family(flux_model).check_config(load_config(REPO / "cfg" / preset, [f"pretrained_model_name_or_path={flux_model}",
                                                                                   "resolution=1000"]))
    assert info.value.field == "resolution" and "992 or 1008" in info.value.fix


def test_caches_hold_the_t5_sequence_and_the_clip_pooled_vector(flux_model, tiny_assets, tmp_path, frozen):
    from ds_diffusers.config import load_config
    from ds_diffusers.data import CaptionedImageDataset, load_train_dataset, prepare_caches
    from ds_diffusers.distributed import DistInfo

    cfg = load_config(REPO / "cfg/default.json", [
        f"pretrained_model_name_or_path={flux_model}", f"dataset_dir={tiny_assets.dataset_dir}", f"cache_dir={tmp_path}",
        "resolution=64", "train_micro_batch_size_per_gpu=4", "cache_latents=true", "cache_text_embeddings=true"])
    hf_dataset = load_train_dataset(cfg.dataset_dir, imagefolder=False).select(range(4))
    single = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    latent_cache, text_cache = prepare_caches(cfg, hf_dataset, "image", "text", frozen, single, log=lambda _: None)
    common = dict(hf_dataset=hf_dataset, image_column="image", caption_column="text", tokenizer=frozen.tokenizer,
                  resolution=64, center_crop=True, random_flip=False, seed=3, tokenizer_2=frozen.tokenizer_2)
    plain, cached = CaptionedImageDataset(**common), CaptionedImageDataset(**common, latent_cache=latent_cache, text_cache=text_cache)
    for index in range(4):
        want, got = plain[index], cached[index]
        assert set(got) == {"index", "latent_parameters", "encoder_hidden_states", "pooled_projections"}
        want_text = frozen.encode_text({name: want[name][None] for name in ("input_ids", "input_ids_2")})
        torch.testing.assert_close(got["encoder_hidden_states"], want_text["encoder_hidden_states"][0])
        torch.testing.assert_close(got["pooled_projections"], want_text["pooled_projections"][0])
        assert got["encoder_hidden_states"].shape == (512, 64) and got["latent_parameters"].shape == (32, 8, 8)
    # The key hashes T5's folders: a cache built for another second encoder is not reused.
    key = json.loads(next(tmp_path.glob("text-*/meta.json")).read_text())["key"]
    assert "text_encoder_2" in json.dumps(key) and "tokenizer_2" in json.dumps(key)
