"""The SD 1.5 / SD 2.x-shaped test models (`embedded.arch_sd`) keep the real block structure, and the
in-process features meet it: the trainer conditions exactly as the real pipeline does, and the
encoder cache stores what the encoders return (the VAE's mid-block attention made a batch's
posterior channels-last, which safetensors refused to write)."""

from __future__ import annotations

import pytest
import torch

from ds_diffusers.data import CaptionedImageDataset, load_train_dataset
from ds_diffusers.embedded.arch_sd import FULL, TEST_RESOLUTION, count_parameters, sd_arch
from ds_diffusers.models import load_frozen_components
from ds_diffusers.objective import diffusion_loss, encode_batch
from tests.helpers import cache_cfg as make_cfg
from tests.helpers import prepare_caches_in_process as prepare

FAMILIES = ("sd15", "sd2")
# What a test model may change: widths and layer counts (and the sizes they imply).
SHRUNK = {
    "unet": {"block_out_channels", "cross_attention_dim", "sample_size", "attention_head_dim"},
    "vae": {"block_out_channels", "sample_size"},
    "text_encoder": {"hidden_size", "intermediate_size", "num_hidden_layers", "projection_dim"},
}


@pytest.fixture(params=FAMILIES)
def family_assets(request):
    return request.param, request.getfixturevalue(f"{request.param}_assets")


def test_full_size_models_have_the_real_parameter_counts():
    assert count_parameters("sd15") == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    # SD 2.1's text encoder is OpenCLIP ViT-H's text tower less its last layer.
    assert count_parameters("sd2") == {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}


@pytest.mark.parametrize("family", FAMILIES)
def test_test_models_differ_from_the_real_configs_only_in_widths_and_depth(family):
    full, test = FULL[family], sd_arch(family, "test")
    for part, allowed in SHRUNK.items():
        full_config, test_config = getattr(full, part), getattr(test, part)
        assert full_config.keys() == test_config.keys()
        changed = {key for key in full_config if full_config[key] != test_config[key]}
        assert changed <= allowed, f"{part}: {changed - allowed} changed"
    assert (test.scheduler, test.scheduler_class, test.pad_token) == (full.scheduler, full.scheduler_class, full.pad_token)
    if family == "sd2":  # per-block heads keep the real rule heads = channels / constant head dim
        heads, channels = test.unet["attention_head_dim"], test.unet["block_out_channels"]
        assert len({c // h for c, h in zip(channels, heads)}) == 1
        assert [c // 64 for c in full.unet["block_out_channels"]] == full.unet["attention_head_dim"]


def test_built_folders_load_with_the_real_structure(family_assets):
    from diffusers import StableDiffusionPipeline

    family, assets = family_assets
    pipe = StableDiffusionPipeline.from_pretrained(assets.model_dir)
    assert len(pipe.vae.encoder.down_blocks) == 4 and pipe.vae_scale_factor == 8
    assert pipe.vae.encoder.mid_block.attentions[0] is not None and pipe.vae.config.scaling_factor == 0.18215
    assert [type(b).__name__ for b in pipe.unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    projection = pipe.unet.down_blocks[0].attentions[0].proj_in
    expected = {"sd15": ("quick_gelu", torch.nn.Conv2d, "epsilon", "PNDMScheduler"),
                "sd2": ("gelu", torch.nn.Linear, "v_prediction", "DDIMScheduler")}[family]
    assert (pipe.text_encoder.config.hidden_act, type(projection), pipe.scheduler.config.prediction_type,
            type(pipe.scheduler).__name__) == expected


def test_trainer_conditions_as_the_real_pipeline(family_assets):
    """SD 2's penultimate-layer features are the truncated encoder's last hidden state: the trainer
    must feed the UNet exactly what `StableDiffusionPipeline.encode_prompt` gives, and train the
    prediction type the scheduler names (SD 2.x-768: the velocity)."""
    from diffusers import StableDiffusionPipeline

    family, assets = family_assets
    frozen = load_frozen_components(str(assets.model_dir), torch.device("cpu"), torch.float32, None)
    assert frozen.noise_scheduler.config.prediction_type == FULL[family].scheduler["prediction_type"]
    assert frozen.noise_scheduler.config.clip_sample is False
    hf_dataset = load_train_dataset(str(assets.dataset_dir), imagefolder=False)
    dataset = CaptionedImageDataset(hf_dataset=hf_dataset, image_column="image", caption_column="text",
                                    tokenizer=frozen.tokenizer, resolution=TEST_RESOLUTION, center_crop=True,
                                    random_flip=False, seed=0)
    example = dataset[0]
    caption = frozen.tokenizer.decode(example["input_ids"], skip_special_tokens=True)
    batch = {"pixel_values": example["pixel_values"][None], "input_ids": example["input_ids"][None]}
    encoded = encode_batch(frozen, batch)
    latents, encoder_hidden_states = encoded.latents, encoded.encoder_hidden_states
    assert latents.shape == (1, 4, TEST_RESOLUTION // 8, TEST_RESOLUTION // 8)
    pipe = StableDiffusionPipeline.from_pretrained(assets.model_dir)
    prompt_embeds, _ = pipe.encode_prompt(caption, torch.device("cpu"), 1, do_classifier_free_guidance=False)
    torch.testing.assert_close(encoder_hidden_states, prompt_embeds, atol=1e-6, rtol=1e-6)

    # A UNet that knows the true noise scores zero only when it answers in the family's prediction type.
    alphas_cumprod = frozen.noise_scheduler.alphas_cumprod

    def oracle(velocity: bool):
        def unet_forward(noisy_latents, timesteps, _hidden):
            alpha = alphas_cumprod[timesteps].view(-1, 1, 1, 1).sqrt()
            sigma = (1 - alphas_cumprod[timesteps]).view(-1, 1, 1, 1).sqrt()
            noise = (noisy_latents - alpha * latents) / sigma
            return alpha * noise - sigma * latents if velocity else noise
        return unet_forward

    # Near t = 0 velocity and noise almost coincide (over 300 draws the wrong answer scored >= 7e-5,
    # the right one <= 1e-14), hence the two far-apart bounds.
    right = family == "sd2"
    losses = []
    for velocity in (right, not right):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            losses.append(diffusion_loss(oracle(velocity), frozen, latents, encoder_hidden_states, compute_dtype=torch.float32).item())
    assert losses[0] < 1e-10 and losses[1] > 1e-6, losses


@pytest.mark.slow  # 20-30 s a family: the VAE encodes the dataset at batch 4
def test_cache_of_a_mid_attention_vae_at_batch_4_equals_the_encoders(family_assets, tmp_path):
    family, assets = family_assets
    cfg = make_cfg(assets.model_dir, assets.dataset_dir, tmp_path / "cache", f"resolution={TEST_RESOLUTION}",
                   "train_micro_batch_size_per_gpu=4", "random_flip=true")
    latent_cache, text_cache, built = prepare(cfg)
    _, _, reused = prepare(cfg)
    assert ["encoded" in m for m in built] == [True, True] and ["reusing" in m for m in reused] == [True, True]

    frozen = load_frozen_components(str(assets.model_dir), torch.device("cpu"), torch.float32, None)
    hf_dataset = load_train_dataset(str(assets.dataset_dir), imagefolder=False)
    dataset = CaptionedImageDataset(hf_dataset=hf_dataset, image_column="image", caption_column="text",
                                    tokenizer=frozen.tokenizer, resolution=TEST_RESOLUTION, center_crop=True,
                                    random_flip=False, seed=0)
    rows = [0, 5, 6]  # rows 5 and 6 sit in different batches of the build, row 0 first in one
    pixels = torch.stack([dataset[row]["pixel_values"] for row in rows])
    with torch.no_grad():
        want = frozen.vae.encode(pixels).latent_dist.parameters
        want_flipped = frozen.vae.encode(torch.flip(pixels, dims=[-1])).latent_dist.parameters
    for position, row in enumerate(rows):
        torch.testing.assert_close(latent_cache.parameters(row, flipped=False), want[position], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(latent_cache.parameters(row, flipped=True), want_flipped[position], atol=1e-5, rtol=1e-5)
    caption = next(iter(text_cache.index))
    input_ids = frozen.tokenizer(caption, max_length=frozen.tokenizer.model_max_length, padding="max_length",
                                 truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want_hidden = frozen.text_encoder(input_ids, return_dict=False)[0][0]
    torch.testing.assert_close(text_cache.embeddings(caption)["encoder_hidden_states"], want_hidden, atol=1e-5, rtol=1e-5)
