"""SD 3.5 on the SD 3.5 Medium-shaped test model (`embedded.arch_sd3`, dual-attention blocks): detection,
conditioning equal to StableDiffusion3Pipeline.encode_prompt (with and without T5), shifted and scaled
latents, the transformer called as diffusers' DreamBooth SD3 script calls it, the preconditioned flow loss
against the script's computation written out here, the default LoRA targets, the hub download and the
presets. Launcher runs: tests/test_sd3_integration.py."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from ds_diffusers.config import load_config, validate_dict
from ds_diffusers.config.checks import check_lora_targets
from ds_diffusers.errors import ConfigError
from ds_diffusers.families import detect_family
from ds_diffusers.families.sd3 import SD3, SD3_LORA_TARGETS, T5_SEQUENCE_LENGTH, has_t5
from ds_diffusers.flow_matching import FlowSettings, flow_matching_loss, flow_objective, training_scheduler
from ds_diffusers.models import build_unet, load_frozen_components, tokenize
from ds_diffusers.objective import encode_batch
from tests.helpers import REPO, with_changes

CAPTIONS = ["a red circle", "a small blue square on black"]


@pytest.fixture(scope="module")
def frozen(sd3_model):
    return load_frozen_components(str(sd3_model), torch.device("cpu"), torch.float32, None)


@pytest.fixture(scope="module")
def pipeline(sd3_model):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(sd3_model)


@pytest.fixture(scope="module")
def without_t5(sd3_model, tmp_path_factory):
    """The same model with model_index.json leaving T5 out, as StableDiffusion3Pipeline allows."""
    folder = tmp_path_factory.mktemp("sd3-no-t5")
    index = json.loads((sd3_model / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder_3": [None, None], "tokenizer_3": [None, None]}))
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        (folder / part).symlink_to(sd3_model / part)
    return folder


def test_sd3_folder_is_detected_and_loads_its_three_encoders(sd3_model, frozen):
    family = detect_family(sd3_model)
    assert family is SD3 and family.objective == "flow" and family.denoiser_class == "SD3Transformer2DModel"
    assert type(frozen.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert [type(encoder).__name__ for encoder in (frozen.text_encoder, frozen.text_encoder_2, frozen.text_encoder_3)] == [
        "CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    assert not frozen.text_encoder_3.training and has_t5(sd3_model)
    # T5 at the scripts' `--max_sequence_length` (77), not the tokenizer folder's 512.
    tokenizer_config = json.loads((sd3_model / "tokenizer_3" / "tokenizer_config.json").read_text())
    assert T5_SEQUENCE_LENGTH == 77 and frozen.tokenizer_3.model_max_length == 77 and tokenizer_config["model_max_length"] == 512
    assert {name: ids.shape[1] for name, ids in tokenize(frozen.tokenizers, CAPTIONS).items()} == {
        "input_ids": 77, "input_ids_2": 77, "input_ids_3": T5_SEQUENCE_LENGTH}
    transformer_config = json.loads((sd3_model / "transformer" / "config.json").read_text())
    assert transformer_config["dual_attention_layers"]  # Medium's MMDiT-X blocks


def test_detection_reads_the_pipeline_class_and_the_t5_entry(tmp_path, sd3_model, without_t5):
    index = json.loads((sd3_model / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert detect_family(tmp_path) is SD3
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    assert detect_family(tmp_path).name == "sd"
    assert detect_family(without_t5) is SD3 and not has_t5(without_t5)


def test_conditioning_equals_sd3_pipeline_encode_prompt(frozen, pipeline):
    text = frozen.encode_text(tokenize(frozen.tokenizers, CAPTIONS))
    with torch.no_grad():  # as StableDiffusion3Pipeline.__call__ runs it
        prompt_embeds, _, pooled_prompt_embeds, _ = pipeline.encode_prompt(
            CAPTIONS, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=T5_SEQUENCE_LENGTH)
    assert set(text) == set(SD3.text_outputs)
    assert torch.equal(text["encoder_hidden_states"], prompt_embeds)
    assert torch.equal(text["pooled_projections"], pooled_prompt_embeds)
    # 77 CLIP tokens (both CLIPs side by side, padded to T5's width) then 77 T5 tokens; both pooled vectors.
    assert prompt_embeds.shape == (2, 77 + T5_SEQUENCE_LENGTH, frozen.text_encoder_3.config.d_model)
    assert pooled_prompt_embeds.shape[1] == frozen.text_encoder.config.projection_dim + frozen.text_encoder_2.config.projection_dim
    batch = {"pixel_values": torch.zeros(2, 3, 64, 64), **tokenize(frozen.tokenizers, CAPTIONS)}
    encoded = encode_batch(frozen, batch, torch.Generator().manual_seed(0))
    assert torch.equal(encoded.encoder_hidden_states, prompt_embeds)
    assert set(encoded.added_cond_kwargs) == {"pooled_projections"}
    assert torch.equal(encoded.added_cond_kwargs["pooled_projections"], pooled_prompt_embeds)


def test_conditioning_without_t5_equals_the_pipeline_zeros(sd3_model, without_t5):
    from diffusers import StableDiffusion3Pipeline

    frozen = load_frozen_components(str(without_t5), torch.device("cpu"), torch.float32, None)
    assert frozen.text_encoder_3 is None and set(frozen.tokenizers) == {"input_ids", "input_ids_2"}
    # How diffusers loads such a folder (its from_pretrained wants the null parts named).
    pipe = StableDiffusion3Pipeline.from_pretrained(without_t5, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None
    text = frozen.encode_text(tokenize(frozen.tokenizers, CAPTIONS))
    with torch.no_grad():
        prompt_embeds, _, pooled_prompt_embeds, _ = pipe.encode_prompt(
            CAPTIONS, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=T5_SEQUENCE_LENGTH)
    assert torch.equal(text["encoder_hidden_states"], prompt_embeds)
    assert torch.equal(text["pooled_projections"], pooled_prompt_embeds)
    assert not prompt_embeds[:, 77:].any() and prompt_embeds[:, :77].any()


def test_latents_are_shifted_then_scaled(frozen):
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    posterior = frozen.vae.encode(pixels).latent_dist
    encoded = encode_batch(frozen, {"pixel_values": pixels, **tokenize(frozen.tokenizers, CAPTIONS)},
                           torch.Generator().manual_seed(0))
    sample = posterior.sample(torch.Generator().manual_seed(0))
    config = frozen.vae.config
    assert (config.shift_factor, config.scaling_factor) == (0.0609, 1.5305)
    assert torch.allclose(encoded.latents, (sample - 0.0609) * 1.5305)
    assert encoded.latents.shape == (2, 16, 8, 8)


def test_transformer_is_called_as_the_dreambooth_script_calls_it(sd3_model, frozen):
    transformer = SD3.load_denoiser(str(sd3_model), None, 0, None).eval()
    text = frozen.encode_text(tokenize(frozen.tokenizers, CAPTIONS))
    calls = []

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return transformer(*args, **kwargs)

    noisy = torch.randn(2, 16, 8, 8)
    timesteps = training_scheduler(frozen.noise_scheduler.config, None).timesteps[torch.tensor([250, 900])]
    forward = SD3.flow_forward(recording, transformer.config, text["encoder_hidden_states"],
                               {"pooled_projections": text["pooled_projections"]})
    with torch.no_grad():
        ours = forward(noisy, timesteps)
        # train_dreambooth_lora_sd3.py: the scheduler's timesteps as they are (σ·1000), latents unpacked.
        reference = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text["encoder_hidden_states"],
                                pooled_projections=text["pooled_projections"], return_dict=False)[0]
    (args, kwargs), = calls
    assert args == () and set(kwargs) == {"hidden_states", "timestep", "encoder_hidden_states", "pooled_projections",
                                          "return_dict"}
    assert kwargs["timestep"] is timesteps and kwargs["hidden_states"] is noisy and kwargs["return_dict"] is False
    assert timesteps.min() > 1  # σ·1000, not σ
    assert torch.equal(kwargs["encoder_hidden_states"], text["encoder_hidden_states"])
    assert torch.equal(kwargs["pooled_projections"], text["pooled_projections"])
    assert torch.equal(ours, reference) and ours.shape == noisy.shape


def script_preconditioned_loss(model, latents, scheduler, generator_seed):
    """train_dreambooth_lora_sd3.py's step with its defaults (`--weighting_scheme logit_normal`,
    `--precondition_outputs 1`), written out."""
    torch.manual_seed(generator_seed)
    noise = torch.randn_like(latents)
    u = compute_density_for_timestep_sampling(weighting_scheme="logit_normal", batch_size=latents.shape[0],
                                              logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[[(scheduler.timesteps == t).nonzero().item() for t in timesteps]].view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * latents + sigmas * noise
    model_pred = model(noisy_model_input, timesteps)
    model_pred = model_pred * (-sigmas) + noisy_model_input  # preconditioning
    target = latents
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sigmas)
    return torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()


def test_flow_loss_is_the_scripts_preconditioned_logit_normal_loss(frozen):
    # What the loop builds for an SD 3.5 run (train.set_up): the family's defaults, the model's scheduler.
    objective = flow_objective(validate_dict(with_changes()), SD3, frozen.noise_scheduler.config)
    scheduler, settings = objective.scheduler, objective.settings
    assert settings.weighting_scheme == "logit_normal" and settings.precondition_outputs
    latents = torch.randn(4, 16, 8, 8)
    weight = torch.randn(16, 16)

    def model(noisy, timesteps):  # any function of its inputs; not the true velocity
        return torch.einsum("bchw,cd->bdhw", noisy, weight) * (timesteps / 1000).view(-1, 1, 1, 1)

    torch.manual_seed(5)
    ours = flow_matching_loss(model, scheduler, latents, settings, compute_dtype=torch.float32)
    oracle = script_preconditioned_loss(model, latents, scheduler, 5)
    torch.testing.assert_close(ours, oracle, rtol=1e-6, atol=0)
    # Unpreconditioned, the same draws give another loss: the family's flag is what changes it.
    torch.manual_seed(5)
    plain = flow_matching_loss(model, scheduler, latents, FlowSettings("logit_normal"), compute_dtype=torch.float32)
    assert not torch.isclose(plain, oracle)


def test_lora_defaults_to_the_sd3_scripts_attention_projections(sd3_model):
    cfg = validate_dict(with_changes(pretrained_model_name_or_path=str(sd3_model), use_lora={"action": True}))
    check_lora_targets(cfg)
    transformer = build_unet(cfg)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in transformer.named_parameters() if ".lora_A." in name}
    assert {name.split(".", 2)[2] for name in adapted} == set(SD3_LORA_TARGETS)
    # Medium's second self-attention (`attn2`) exists and is left alone, as the script's targets leave it.
    assert any(".attn2." in name for name, _ in transformer.named_modules()) and not any(".attn2." in name for name in adapted)


def test_hub_download_takes_the_t5_encoder_and_tokenizer():
    from ds_diffusers.config.hub import HubSource, files_to_download

    repo = ["model_index.json", "sd3.5_medium.safetensors", "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
            *[f"{part}/{name}" for part in ("text_encoder", "text_encoder_2") for name in ("config.json", "model.safetensors")],
            "text_encoder_3/config.json", "text_encoder_3/model.safetensors.index.json",
            "text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model-00002-of-00002.safetensors",
            "tokenizer/vocab.json", "tokenizer_2/vocab.json", "tokenizer_3/spiece.model", "tokenizer_3/tokenizer.json",
            "scheduler/scheduler_config.json"]
    wanted = set(files_to_download(repo, HubSource("pretrained_model_name_or_path", "stabilityai/stable-diffusion-3.5-medium",
                                                   "pipeline", None, "revision", None)))
    assert {"text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model-00002-of-00002.safetensors",
            "text_encoder_3/model.safetensors.index.json", "tokenizer_3/spiece.model", "tokenizer_3/tokenizer.json"} <= wanted
    assert "sd3.5_medium.safetensors" not in wanted


@pytest.mark.parametrize("key, value", [("prediction_type", "epsilon"), ("snr_gamma", 5.0)])
def test_epsilon_keys_are_refused_in_one_line(sd3_model, key, value):
    cfg = validate_dict(with_changes(pretrained_model_name_or_path=str(sd3_model), **{key: value}))
    with pytest.raises(ConfigError) as info:
        SD3.check_config(cfg)
    assert info.value.field == key and "Stable Diffusion 3.5" in info.value.fix and "\n" not in str(info.value)


@pytest.mark.parametrize("preset, hub_id", [("sd35_lora.json", "stabilityai/stable-diffusion-3.5-medium"),
                                            ("sd35_full.json", "stabilityai/stable-diffusion-3.5-large")])
def test_presets_name_sd35_and_pass_the_family_checks(sd3_model, preset, hub_id):
    cfg = load_config(REPO / "cfg" / preset)
    assert cfg.pretrained_model_name_or_path == hub_id and cfg.resolution == 1024
    assert cfg.bf16.enabled and cfg.gradient_checkpointing and cfg.prediction_type is None and cfg.snr_gamma is None
    on_test_model = load_config(REPO / "cfg" / preset, [f"pretrained_model_name_or_path={sd3_model}"])
    SD3.check_config(on_test_model)
    if cfg.use_lora.action:
        assert cfg.use_lora.target_modules is None and cfg.zero_optimization.stage == 2
        check_lora_targets(on_test_model)
    else:
        assert cfg.zero_optimization.stage == 3 and cfg.zero_optimization.offload_optimizer.device == "cpu"
    with pytest.raises(ConfigError) as info:
        SD3.check_config(load_config(REPO / "cfg" / preset, [f"pretrained_model_name_or_path={sd3_model}", "resolution=1000"]))
    assert info.value.field == "resolution" and "992 or 1008" in info.value.fix


def test_a_missing_t5_folder_that_model_index_names_is_refused(sd3_model, without_t5, tmp_path):
    index = json.loads((sd3_model / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    cfg = validate_dict(with_changes(pretrained_model_name_or_path=str(tmp_path)))
    with pytest.raises(ConfigError) as info:
        SD3.check_config(cfg)
    assert "text_encoder_3, tokenizer_3" in info.value.fix
    SD3.check_config(validate_dict(with_changes(pretrained_model_name_or_path=str(without_t5))))
