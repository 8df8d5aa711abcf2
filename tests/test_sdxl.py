"""SDXL on an SDXL-shaped test model (real block types and options, tiny widths): the model mirrors the
real config, conditioning equals what StableDiffusionXLPipeline computes, crops are recorded per
sample, the VAE is upcast like force_upcast, caches hold both encoders' outputs, and mistakes
(another family's checkpoint or LoRA) stop with one line. Multi-process runs: tests/test_sdxl_integration.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from ds_diffusers.config import load_config
from ds_diffusers.data import CaptionedImageDataset, load_train_dataset, prepare_caches
from ds_diffusers.data.file_digests import DIGESTS_FILE
from ds_diffusers.data.transforms import preprocess_image_with_crop
from ds_diffusers.distributed import DistInfo
from ds_diffusers.errors import ConfigError
from ds_diffusers.models import load_frozen_components
from ds_diffusers.objective import encode_batch
from tests.helpers import REPO

SINGLE = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
CAPTIONS = ["a red circle", "a small blue square on black"]


@pytest.fixture(scope="module")
def frozen(sdxl_model):
    return load_frozen_components(str(sdxl_model), torch.device("cpu"), torch.float32, None)


def test_model_has_the_real_sdxl_options(sdxl_model):
    unet = json.loads((sdxl_model / "unet" / "config.json").read_text())
    vae = json.loads((sdxl_model / "vae" / "config.json").read_text())
    encoder_1 = json.loads((sdxl_model / "text_encoder" / "config.json").read_text())
    encoder_2 = json.loads((sdxl_model / "text_encoder_2" / "config.json").read_text())
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet["use_linear_projection"] and unet["addition_embed_type"] == "text_time"
    assert len(unet["transformer_layers_per_block"]) == 3 and len(unet["attention_head_dim"]) == 3
    assert unet["cross_attention_dim"] == encoder_1["hidden_size"] + encoder_2["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == encoder_2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    assert vae["force_upcast"] and vae["scaling_factor"] == 0.13025 and vae["mid_block_add_attention"]
    assert len(vae["block_out_channels"]) == 4  # latents at 1/8 of the image
    assert encoder_2["architectures"] == ["CLIPTextModelWithProjection"]
    assert json.loads((sdxl_model / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def test_transforms_record_original_size_and_crop_as_shown():
    image = Image.new("RGB", (300, 200))
    for flip_seed in range(20):  # some seeds flip, some do not
        generator = torch.Generator().manual_seed(flip_seed)
        pixels, record = preprocess_image_with_crop(image, 64, False, True, generator)
        assert pixels.shape == (3, 64, 64) and record.original_size == (200, 300) and record.resized_width == 96
        top, left = record.crop_top_left
        assert top == 0 and 0 <= left <= 96 - 64
    centre = preprocess_image_with_crop(image, 64, True, False, torch.Generator())[1]
    assert centre.crop_top_left == (0, 16) and centre.mirrored().crop_top_left == (0, 96 - 16 - 64)


def test_conditioning_equals_the_sdxl_pipeline(sdxl_model, frozen):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_model)
    want_hidden, _, want_pooled, _ = pipe.encode_prompt(CAPTIONS, do_classifier_free_guidance=False)
    want_time_ids = pipe._get_add_time_ids((200, 300), (0, 16), (64, 64), dtype=torch.float32,
                                           text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    batch = {**{name: ids for name, ids in _tokens(frozen).items()},
             "pixel_values": torch.zeros(2, 3, 64, 64), "original_size": torch.tensor([[200, 300]] * 2),
             "crop_top_left": torch.tensor([[0, 16]] * 2)}
    encoded = encode_batch(frozen, batch)
    assert encoded.latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(encoded.encoder_hidden_states, want_hidden)
    torch.testing.assert_close(encoded.added_cond_kwargs["text_embeds"], want_pooled)
    torch.testing.assert_close(encoded.added_cond_kwargs["time_ids"], want_time_ids.expand(2, 6))


def test_time_ids_are_built_without_host_data():
    """Every SDXL micro-step builds time ids on the batch's device; a tensor made from Python numbers
    there (aten.lift_fresh) is a blocking host-to-GPU copy per micro-step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ds_diffusers.objective import add_time_ids

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    batch = {"original_size": torch.tensor([[200, 300], [64, 80]]), "crop_top_left": torch.tensor([[0, 16], [3, 0]])}
    with Ops() as ops:
        time_ids = add_time_ids(batch, (64, 48))
    assert torch.equal(time_ids, torch.tensor([[200, 300, 0, 16, 64, 48], [64, 80, 3, 0, 64, 48]]))
    assert "lift_fresh" not in ops.names, ops.names


def _tokens(frozen):
    from ds_diffusers.models import tokenize

    ids = tokenize(frozen.tokenizers, CAPTIONS)
    assert set(ids) == {"input_ids", "input_ids_2"} and not torch.equal(ids["input_ids"], ids["input_ids_2"])  # "!" pads the second
    return ids


def test_fp16_keeps_the_force_upcast_vae_in_fp32_and_it_decodes_fp16_latents(sdxl_model):
    frozen16 = load_frozen_components(str(sdxl_model), torch.device("cpu"), torch.float16, None)
    assert frozen16.vae.dtype == torch.float32 and frozen16.text_encoder_2.dtype == torch.float16
    image = frozen16.vae.decode(torch.randn(1, 4, 8, 8, dtype=torch.float16)).sample
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    fixed = load_frozen_components(str(sdxl_model), torch.device("cpu"), torch.bfloat16, None, vae_path=str(sdxl_model / "vae"))
    assert fixed.vae.dtype == torch.bfloat16  # bf16 has fp32's range: no upcast


def test_caches_hold_both_encoders_and_the_crops(sdxl_model, tiny_assets, tmp_path, frozen):
    cfg = load_config(REPO / "cfg/default.json", [
        f"pretrained_model_name_or_path={sdxl_model}", f"dataset_dir={tiny_assets.dataset_dir}", f"cache_dir={tmp_path}",
        "resolution=64", "train_micro_batch_size_per_gpu=4", "cache_latents=true", "cache_text_embeddings=true",
        "random_flip=true"])
    hf_dataset = load_train_dataset(cfg.dataset_dir, imagefolder=False).select(range(12))
    latent_cache, text_cache = prepare_caches(cfg, hf_dataset, "image", "text", frozen, SINGLE, log=lambda _: None)
    common = dict(hf_dataset=hf_dataset, image_column="image", caption_column="text", tokenizer=frozen.tokenizer,
                  resolution=64, center_crop=True, random_flip=True, seed=3, tokenizer_2=frozen.tokenizer_2, record_crop=True)
    plain, cached = CaptionedImageDataset(**common), CaptionedImageDataset(**common, latent_cache=latent_cache, text_cache=text_cache)
    for index in range(12):
        want, got = plain[index], cached[index]
        assert set(got) == {"index", "latent_parameters", "encoder_hidden_states", "text_embeds", "original_size", "crop_top_left"}
        want_text = frozen.encode_text({name: want[name][None] for name in ("input_ids", "input_ids_2")})
        torch.testing.assert_close(got["encoder_hidden_states"], want_text["encoder_hidden_states"][0])
        torch.testing.assert_close(got["text_embeds"], want_text["text_embeds"][0])
        with torch.no_grad():
            want_parameters = frozen.vae.encode(want["pixel_values"][None]).latent_dist.parameters[0]
        torch.testing.assert_close(got["latent_parameters"], want_parameters, atol=1e-5, rtol=1e-5)
        assert torch.equal(got["original_size"], want["original_size"]) and torch.equal(got["crop_top_left"], want["crop_top_left"])
    assert {p.name.split("-")[0] for p in tmp_path.iterdir() if p.name != DIGESTS_FILE} == {"latents", "text"}
    assert (tmp_path / DIGESTS_FILE).is_file()  # the encoder files' digests, for the next start's key
    sd_key = json.loads(next(tmp_path.glob("text-*/meta.json")).read_text())["key"]
    assert "text_encoder_2" in sd_key and "tokenizer_2" in sd_key


def test_resuming_another_familys_checkpoint_is_refused_before_anything_is_written(sdxl_model, tiny_assets, tmp_path):
    from ds_diffusers import checkpoint

    step = tmp_path / "checkpoints" / "step_4"
    step.mkdir(parents=True)
    (step / checkpoint.META_FILE).write_text(json.dumps({"settings": {"model family": "sd"}}))
    (tmp_path / "checkpoints" / checkpoint.LATEST).write_text("step_4")
    cfg = load_config(REPO / "cfg/default.json", [f"pretrained_model_name_or_path={sdxl_model}", f"dataset_dir={tiny_assets.dataset_dir}",
                                                   f"checkpoint_dir={tmp_path / 'checkpoints'}", "resume_from_checkpoint=latest"])
    with pytest.raises(ConfigError, match="Stable Diffusion 1.x/2.x model but pretrained_model_name_or_path=.* is Stable Diffusion XL"):
        checkpoint.resume_target(cfg)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["checkpoints", "step_4", checkpoint.META_FILE, checkpoint.LATEST])


def test_sd15_lora_on_sdxl_is_refused_when_sampling(sdxl_model, tiny_assets, tmp_path):
    from diffusers import UNet2DConditionModel

    from ds_diffusers.config.schema import LoraCfg
    from ds_diffusers.export import write_lora
    from ds_diffusers.models import add_lora
    from ds_diffusers.sampling.plan import SamplePlan
    from ds_diffusers.sampling.weights import resolve_weights

    unet = UNet2DConditionModel.from_pretrained(tiny_assets.model_dir, subfolder="unet")  # the SD 1.x-layout model
    add_lora(unet, LoraCfg(action=True))
    write_lora(unet, {name: param.detach() for name, param in unet.named_parameters() if param.requires_grad}, tmp_path)
    cfg = load_config(REPO / "cfg/default.json", [
        f"pretrained_model_name_or_path={sdxl_model}", f"dataset_dir={tiny_assets.dataset_dir}", f"output_dir={tmp_path / 'out'}",
        f"sample.loras=[{{\"path\": \"{tmp_path}\", \"weight\": 1.0}}]", "sample.weights=[\"lora\"]"])
    with pytest.raises(ConfigError, match=r"sample.loras\[0\].path=.*64-wide text conditioning.*takes 96"):
        resolve_weights(cfg, SamplePlan.from_config(cfg))


def test_sdxl_folder_without_its_second_encoder_is_named(sdxl_model, tmp_path):
    from ds_diffusers.config.checks import check_model_dir

    broken = tmp_path / "broken"
    shutil.copytree(sdxl_model, broken, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(ConfigError, match="no text_encoder_2 subfolder"):
        check_model_dir(str(broken))


def test_sdxl_presets_refuse_a_resolution_that_is_not_a_multiple_of_8():
    for preset in ("sdxl_lora.json", "sdxl_full.json"):
        assert load_config(REPO / "cfg" / preset).resolution == 1024
        with pytest.raises(ConfigError) as info:
            load_config(REPO / "cfg" / preset, ["resolution=1020"])
        assert info.value.field == "resolution" and info.value.value == 1020 and "use 1016 or 1024" in info.value.fix
