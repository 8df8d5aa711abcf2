"""Qwen-Image on the Qwen-Image-shaped test model (`embedded.arch_qwen_image`): detection, conditioning equal
to QwenImagePipeline.encode_prompt on the unpadded tokens (fixed length and mask beside it), latents
normalised as the pipeline denormalises them, the transformer called as diffusers'
train_dreambooth_lora_qwen_image.py calls it, the LoRA targets, the preset, the hub files, and the
caches. Launcher runs: tests/test_qwen_image_integration.py."""

from __future__ import annotations

import json

import pytest
import torch

from ds_diffusers.config import validate_dict
from ds_diffusers.config.checks import check_lora_targets
from ds_diffusers.errors import ConfigError
from ds_diffusers.families import detect_family
from ds_diffusers.families.flux import pack_latents, unpack_latents
from ds_diffusers.families.qwen_image import PROMPT_TEMPLATE, TEMPLATE_TOKENS, TRAINING_MAX_SEQUENCE_LENGTH
from ds_diffusers.models import build_unet, load_frozen_components, tokenize
from ds_diffusers.objective import encode_batch
from tests.helpers import REPO, with_changes

CAPTIONS = ["a red circle", "a small blue square on black"]


@pytest.fixture(scope="module")
def frozen(qwen_image_model):
    return load_frozen_components(str(qwen_image_model), torch.device("cpu"), torch.float32, None)


@pytest.fixture(scope="module")
def pipeline(qwen_image_model):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(qwen_image_model)


def test_qwen_image_folder_is_detected_and_loads_its_parts(qwen_image_model, frozen):
    family = detect_family(qwen_image_model)
    assert family.name == "qwen_image" and family.objective == "flow" and family.denoiser_folder == "transformer"
    assert type(frozen.vae).__name__ == "AutoencoderKLQwenImage"
    assert type(frozen.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration" and not frozen.text_encoder.training
    assert type(frozen.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and frozen.tokenizer_2 is None
    assert tokenize(frozen.tokenizers, CAPTIONS)["input_ids"].shape == (2, TEMPLATE_TOKENS + 512)


def test_detection_reads_the_pipeline_class(tmp_path, qwen_image_model):
    index = json.loads((qwen_image_model / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert detect_family(tmp_path).name == "qwen_image"
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPipeline"}))
    assert detect_family(tmp_path).name == "sd"  # the edit pipeline is not this family


def test_conditioning_equals_qwen_image_pipeline_encode_prompt(frozen, pipeline):
    assert pipeline.prompt_template_encode == PROMPT_TEMPLATE and pipeline.prompt_template_encode_start_idx == TEMPLATE_TOKENS
    text = frozen.encode_text(tokenize(frozen.tokenizers, CAPTIONS))
    with torch.no_grad():  # as QwenImagePipeline.__call__ runs it
        prompt_embeds, prompt_embeds_mask = pipeline.encode_prompt(CAPTIONS, device="cpu")
    features, mask = text["encoder_hidden_states"], text["encoder_hidden_states_mask"]
    assert features.shape == (2, TRAINING_MAX_SEQUENCE_LENGTH, 64) and mask.shape == (2, TRAINING_MAX_SEQUENCE_LENGTH)
    lengths = prompt_embeds_mask.sum(dim=1)
    assert lengths[0] < lengths[1] and torch.equal(mask.sum(dim=1), lengths) and mask.dtype == prompt_embeds_mask.dtype
    for row, length in enumerate(lengths.tolist()):
        assert torch.equal(features[row, :length], prompt_embeds[row, :length])  # exactly, bit for bit
        assert torch.equal(mask[row, :length], prompt_embeds_mask[row, :length]) and not mask[row, length:].any()
        assert not features[row, length:].any()  # padding is zeros, as the pipeline pads
    # One caption alone encodes as the pipeline encodes it alone.
    alone = frozen.encode_text(tokenize(frozen.tokenizers, CAPTIONS[:1]))["encoder_hidden_states"]
    with torch.no_grad():
        reference = pipeline.encode_prompt(CAPTIONS[:1], device="cpu")[0]
    assert torch.equal(alone[0, :reference.shape[1]], reference[0])


def test_latents_are_normalised_as_the_pipeline_denormalises_them(frozen):
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    # The script's 5D path: one frame in, its posterior sampled, then (z − mean) / std.
    posterior = frozen.vae.encode(pixels.unsqueeze(2)).latent_dist
    sample = posterior.sample(torch.Generator().manual_seed(0))
    encoded = encode_batch(frozen, {"pixel_values": pixels, **tokenize(frozen.tokenizers, CAPTIONS)},
                           torch.Generator().manual_seed(0))
    assert encoded.latents.shape == (2, 16, 8, 8) and set(encoded.added_cond_kwargs) == {"encoder_hidden_states_mask"}
    config = frozen.vae.config
    # QwenImagePipeline's decode step: latents / (1 / std) + mean, on [B, C, 1, h, w].
    mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, 16, 1, 1, 1)
    denormalised = encoded.latents.unsqueeze(2) / inverse_std + mean
    torch.testing.assert_close(denormalised, sample, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(encoded.latents, sample[:, :, 0], atol=0.1)  # the normalisation does act


def test_transformer_is_called_as_the_dreambooth_script_calls_it(qwen_image_model, frozen, pipeline):
    family = detect_family(qwen_image_model)
    transformer = family.load_denoiser(str(qwen_image_model), None, 0, None).eval()
    text = frozen.encode_text(tokenize(frozen.tokenizers, CAPTIONS))
    calls: list[dict] = []
    transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    noisy = torch.randn(2, 16, 8, 8)
    timesteps = torch.tensor([250.0, 900.0])
    forward = family.flow_forward(transformer, transformer.config, text["encoder_hidden_states"],
                                  {"encoder_hidden_states_mask": text["encoder_hidden_states_mask"].float()})
    with torch.no_grad():
        ours = forward(noisy, timesteps)
        # train_dreambooth_lora_qwen_image.py: [B, C, 1, h, w] -> [B, 1, C, h, w], packed by the pipeline's
        # _pack_latents, σ = t / 1000, the prompt mask, (1, h/2, w/2) per image, no guidance.
        script_input = pipeline._pack_latents(noisy.unsqueeze(2).permute(0, 2, 1, 3, 4), 2, 16, 8, 8)
        reference = transformer(hidden_states=script_input, encoder_hidden_states=text["encoder_hidden_states"],
                                encoder_hidden_states_mask=text["encoder_hidden_states_mask"], timestep=timesteps / 1000,
                                img_shapes=[(1, 4, 4)] * 2, return_dict=False)[0]
    ours_call, script_call = calls
    assert set(ours_call) == set(script_call) and ours_call["img_shapes"] == script_call["img_shapes"]
    for name in ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep"):
        assert ours_call[name].dtype == script_call[name].dtype and torch.equal(ours_call[name], script_call[name]), name
    assert not transformer.config.guidance_embeds and "guidance" not in ours_call
    assert torch.equal(ours, pipeline._unpack_latents(reference, 64, 64, 8)[:, :, 0])
    assert torch.equal(pack_latents(noisy), script_input) and torch.equal(unpack_latents(script_input, 8, 8), noisy)


def test_lora_defaults_to_the_scripts_attention_projections(qwen_image_model):
    cfg = validate_dict(with_changes(pretrained_model_name_or_path=str(qwen_image_model), use_lora={"action": True}))
    check_lora_targets(cfg)
    transformer = build_unet(cfg)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in transformer.named_parameters() if ".lora_A." in name}
    assert {name.split(".", 2)[2] for name in adapted} == {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"}
    assert len(adapted) == 4 * transformer.config.num_layers
    assert all(not param.requires_grad for name, param in transformer.named_parameters() if "lora_" not in name)


@pytest.mark.parametrize("key, value", [("prediction_type", "epsilon"), ("snr_gamma", 5.0)])
def test_keys_qwen_image_cannot_honour_are_refused_in_one_line(qwen_image_model, key, value):
    cfg = validate_dict(with_changes(pretrained_model_name_or_path=str(qwen_image_model), **{key: value}))
    with pytest.raises(ConfigError) as info:
        detect_family(qwen_image_model).check_config(cfg)
    assert info.value.field == key and "Qwen-Image" in info.value.fix and "\n" not in str(info.value)


def test_a_held_out_split_is_accepted(qwen_image_model):
    """The held-out loss has a flow form (flow_matching.fixed_sigma_loss), so validation_split is not refused."""
    cfg = validate_dict(with_changes(pretrained_model_name_or_path=str(qwen_image_model), validation_split=0.1))
    detect_family(qwen_image_model).check_config(cfg)


def test_preset_names_qwen_image_and_passes_the_family_checks(qwen_image_model):
    from ds_diffusers.config import load_config
    from ds_diffusers.config.deepspeed import to_deepspeed_config

    preset = REPO / "cfg" / "qwen_image_lora.json"
    cfg = load_config(preset)
    assert cfg.pretrained_model_name_or_path == "Qwen/Qwen-Image" and cfg.bf16.enabled and cfg.use_lora.action
    assert cfg.zero_optimization.stage == 3 and cfg.gradient_checkpointing and cfg.use_lora.target_modules is None
    assert cfg.prediction_type is None and cfg.snr_gamma is None and cfg.resolution % 16 == 0
    on_test_model = load_config(preset, [f"pretrained_model_name_or_path={qwen_image_model}"])
    detect_family(qwen_image_model).check_config(on_test_model)
    check_lora_targets(on_test_model)
    assert to_deepspeed_config(on_test_model, world_size=8)["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError) as info:
        detect_family(qwen_image_model).check_config(load_config(preset, [f"pretrained_model_name_or_path={qwen_image_model}",
                                                                          "resolution=1000"]))
    assert info.value.field == "resolution" and "992 or 1008" in info.value.fix


def test_hub_download_takes_what_qwen_image_loads():
    from ds_diffusers.config.hub import HubSource, files_to_download

    transformer = [f"transformer/diffusion_pytorch_model-0000{i}-of-00009.safetensors" for i in range(1, 10)]
    text_encoder = [f"text_encoder/model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    tokenizer = ["tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
                 "tokenizer/added_tokens.json", "tokenizer/special_tokens_map.json", "tokenizer/chat_template.jinja"]
    repo = ["model_index.json", "README.md", "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors.index.json", *transformer, "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/generation_config.json",
            "text_encoder/model.safetensors.index.json", *text_encoder, *tokenizer, "scheduler/scheduler_config.json"]
    wanted = set(files_to_download(repo, HubSource("pretrained_model_name_or_path", "Qwen/Qwen-Image", "pipeline", None,
                                                   "revision", None)))
    assert wanted == set(repo) - {"README.md"}


def test_caches_hold_the_prompt_features_and_their_mask(qwen_image_model, tiny_assets, tmp_path, frozen):
    from ds_diffusers.config import load_config
    from ds_diffusers.data import CaptionedImageDataset, load_train_dataset, prepare_caches
    from ds_diffusers.distributed import DistInfo

    cfg = load_config(REPO / "cfg/default.json", [
        f"pretrained_model_name_or_path={qwen_image_model}", f"dataset_dir={tiny_assets.dataset_dir}", f"cache_dir={tmp_path}",
        "resolution=64", "train_micro_batch_size_per_gpu=2", "cache_latents=true", "cache_text_embeddings=true"])
    hf_dataset = load_train_dataset(cfg.dataset_dir, imagefolder=False).select(range(2))
    single = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    latent_cache, text_cache = prepare_caches(cfg, hf_dataset, "image", "text", frozen, single, log=lambda _: None)
    common = dict(hf_dataset=hf_dataset, image_column="image", caption_column="text", tokenizer=frozen.tokenizer,
                  resolution=64, center_crop=True, random_flip=False, seed=3)
    plain, cached = CaptionedImageDataset(**common), CaptionedImageDataset(**common, latent_cache=latent_cache, text_cache=text_cache)
    for index in range(2):
        want, got = plain[index], cached[index]
        assert set(got) == {"index", "latent_parameters", "encoder_hidden_states", "encoder_hidden_states_mask"}
        want_text = frozen.encode_text({"input_ids": want["input_ids"][None]})
        length = int(want_text["encoder_hidden_states_mask"].sum())
        assert torch.equal(got["encoder_hidden_states_mask"], want_text["encoder_hidden_states_mask"][0])
        torch.testing.assert_close(got["encoder_hidden_states"][:length], want_text["encoder_hidden_states"][0, :length])
        assert got["encoder_hidden_states"].shape == (512, 64) and got["latent_parameters"].shape == (32, 8, 8)
        posterior = frozen.vae.encode(want["pixel_values"][None, :, None]).latent_dist
        torch.testing.assert_close(got["latent_parameters"], posterior.parameters[0, :, 0])


def test_a_negative_prompt_runs_the_pipelines_true_cfg(qwen_image_model, pipeline):
    from ds_diffusers.generation import generate_images

    family = detect_family(qwen_image_model)
    latents = torch.randn(1, 16, 8, 8)
    assert family.pipeline_inputs(pipeline, latents, None, None)["true_cfg_scale"] == 1.0  # no CFG, no warning
    with_negative = family.pipeline_inputs(pipeline, latents, ["blurry"], None)
    assert with_negative["negative_prompt"] == ["blurry"] and "true_cfg_scale" not in with_negative  # the pipeline's 4.0
    assert torch.equal(with_negative["latents"], pack_latents(latents))
    common = dict(seed=0, num_images=1, resolution=64, num_inference_steps=2, guidance_scale=1.0, output_type="np")
    plain = generate_images(pipeline, "a red circle", 0, **common)
    guided = generate_images(pipeline, "a red circle", 0, negative_prompt="blurry", **common)
    assert plain.shape == guided.shape == (1, 64, 64, 3) and abs(plain - guided).max() > 1e-4
