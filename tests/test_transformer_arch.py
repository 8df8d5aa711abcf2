"""The flow-matching transformer families' architectures (`embedded.arch_flux`, `arch_sd3`,
`arch_qwen_image`): the full-size configs build the published models (counted on the meta device),
the test models change only widths and depths, and the folders they write load in diffusers' own
pipelines and sample; the sharded Flux transformer's index is read by the partitioned load's file map."""

from __future__ import annotations

import pytest
import torch

from ds_diffusers.embedded import arch_flux, arch_qwen_image, arch_sd3
from ds_diffusers.embedded.arch_flow import TEST_RESOLUTION, write_t5_tokenizer

# Keys a test config may change: widths, head counts, depths and the sizes they imply.
SHRUNK = {
    "transformer": {"attention_head_dim", "axes_dims_rope", "num_attention_heads", "num_layers", "num_single_layers",
                    "joint_attention_dim", "pooled_projection_dim", "caption_projection_dim", "sample_size",
                    "pos_embed_max_size", "dual_attention_layers"},
    "vae": {"block_out_channels", "sample_size", "base_dim", "num_res_blocks"},
    "text_encoder": {"hidden_size", "intermediate_size", "num_hidden_layers", "projection_dim"},
    "text_encoder_2": {"hidden_size", "intermediate_size", "num_hidden_layers", "projection_dim", "d_model", "d_ff",
                       "d_kv", "num_heads", "num_layers", "num_decoder_layers", "vocab_size"},
    "text_encoder_3": {"d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers", "vocab_size"},
    "text_config": {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "max_position_embeddings", "rope_scaling"},
    "vision_config": {"depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "fullatt_block_indexes"},
}
ARCHS = {
    "flux-dev": lambda size: arch_flux.flux_arch("dev", size),
    "flux-schnell": lambda size: arch_flux.flux_arch("schnell", size),
    "sd35-medium": lambda size: arch_sd3.sd3_arch("medium", size),
    "sd35-large": lambda size: arch_sd3.sd3_arch("large", size),
    "qwen-image": arch_qwen_image.qwen_image_arch,
}
T5_XXL, CLIP_L = 4_762_310_656, 123_060_480


def test_full_size_transformers_have_the_published_parameter_counts():
    flux = arch_flux.count_parameters("dev")
    assert flux == {"transformer": arch_flux.FLUX_DEV_PARAMETERS, "vae": 83_819_683, "text_encoder": CLIP_L,
                    "text_encoder_2": T5_XXL}
    assert round(flux["transformer"] / 1e9, 1) == 11.9  # the published 11.9B ("12B")
    # schnell: the same transformer less the guidance embedder (two 3072-wide linears on 256 features).
    assert arch_flux.count_parameters("schnell")["transformer"] == flux["transformer"] - (256 * 3072 + 3072 + 3072 ** 2 + 3072)
    large, medium = arch_sd3.count_parameters("large"), arch_sd3.count_parameters("medium")
    assert large["transformer"] == arch_sd3.SD35_LARGE_PARAMETERS and round(large["transformer"] / 1e9, 1) == 8.1
    # Medium's published config builds 2.24B; Stability AI announces "2.5B" (docs/memory.md).
    assert medium["transformer"] == arch_sd3.SD35_MEDIUM_PARAMETERS and 2.2e9 < medium["transformer"] < 2.5e9
    assert large["text_encoder_3"] == T5_XXL and large["text_encoder_2"] == 694_659_840  # OpenCLIP bigG text + projection
    qwen = arch_qwen_image.count_parameters()
    assert qwen["transformer"] == arch_qwen_image.QWEN_IMAGE_PARAMETERS and round(qwen["transformer"] / 1e9, 1) == 20.4
    assert qwen["text_encoder"] == 8_292_166_656  # Qwen2.5-VL-7B-Instruct's published 8.29B


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_test_models_differ_from_the_real_configs_only_in_widths_and_depths(name):
    full, test = ARCHS[name]("full"), ARCHS[name]("test")
    for part in vars(full):
        full_config, test_config = getattr(full, part), getattr(test, part)
        assert full_config.keys() == test_config.keys(), part
        changed = {key for key in full_config if full_config[key] != test_config[key]}
        assert changed <= SHRUNK.get(part, set()), f"{part}: {changed - SHRUNK.get(part, set())} changed"
    transformer = test.transformer
    if "axes_dims_rope" in transformer:  # the rotary axes still fill each head
        assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    if name == "sd35-medium":  # MMDiT-X: dual attention in the first half of the blocks, as the real 13 of 24
        assert transformer["dual_attention_layers"] == [0] and transformer["num_layers"] == 2


def test_t5_tokenizer_is_t5_shaped(tmp_path):
    tokenizer = write_t5_tokenizer(tmp_path / "t5", model_max_length=16)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a red circle", padding="max_length", max_length=8).input_ids
    assert ids[3:] == [1, 0, 0, 0, 0]  # one piece per caption word, </s>, then padding
    assert tokenizer.decode(tokenizer("Zebra #7!").input_ids, skip_special_tokens=True) == "Zebra #7!"


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("flux-dev")
    arch_flux.build_flux(out_dir, "dev")
    return out_dir


def _sample(pipe, **kwargs):
    return pipe("a red circle", num_inference_steps=2, height=TEST_RESOLUTION, width=TEST_RESOLUTION,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def test_flux_folder_samples_in_flux_pipeline(flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir)
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor == arch_flux.FLUX_VAE_SHIFT
    assert pipe.transformer.config.guidance_embeds and len(pipe.transformer.single_transformer_blocks) == 2
    images = _sample(pipe, guidance_scale=3.5, max_sequence_length=32)
    assert images.shape == (1, TEST_RESOLUTION, TEST_RESOLUTION, 3) and images.std() > 0


@pytest.mark.parametrize("variant", ["medium", pytest.param("large", marks=pytest.mark.slow)])
def test_sd35_folder_samples_in_sd3_pipeline(tmp_path, variant):
    from diffusers import StableDiffusion3Pipeline

    arch_sd3.build_sd3(tmp_path, variant)
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path)
    dual = [block.attn2 is not None for block in pipe.transformer.transformer_blocks]
    assert dual == ([True, False] if variant == "medium" else [False, False])
    assert pipe.transformer.transformer_blocks[0].attn.norm_q is not None  # QK RMS-norm
    images = _sample(pipe, max_sequence_length=32)
    assert images.shape == (1, TEST_RESOLUTION, TEST_RESOLUTION, 3) and images.std() > 0


def test_qwen_image_folder_samples_in_qwen_image_pipeline(tmp_path):
    from diffusers import QwenImagePipeline

    arch_qwen_image.build_qwen_image(tmp_path)
    pipe = QwenImagePipeline.from_pretrained(tmp_path)
    template_ids = pipe.tokenizer(pipe.prompt_template_encode.format("")).input_ids
    assert len(template_ids) > pipe.prompt_template_encode_start_idx  # the dropped prefix is all template
    images = _sample(pipe)
    assert images.shape == (1, TEST_RESOLUTION, TEST_RESOLUTION, 3) and images.std() > 0


def test_flux_transformer_ships_sharded_and_the_partitioned_load_reads_its_index(flux_dir):
    from diffusers import FluxTransformer2DModel

    from ds_diffusers.engine.zero_load import INDEX, weight_files

    folder = flux_dir / "transformer"
    assert (folder / INDEX).is_file()
    files = weight_files(folder)
    state = FluxTransformer2DModel.from_pretrained(folder).state_dict()
    assert files is not None and set(files) == set(state)
    assert len(set(files.values())) >= 2 and all(path.is_file() for path in files.values())


def test_flux_transformer_loads_partitioned_under_zero3(flux_dir, one_rank):
    """The sharded transformer built inside zero.Init: every parameter partitioned, and gathered it
    equals `from_pretrained` tensor by tensor."""
    from diffusers import FluxTransformer2DModel

    from ds_diffusers.config import to_deepspeed_config, validate_dict
    from ds_diffusers.engine import gathered
    from ds_diffusers.engine.zero_load import load_partitioned

    cfg = validate_dict({"pretrained_model_name_or_path": str(flux_dir), "dataset_dir": ".",
                         "zero_optimization": {"stage": 3}})
    model = load_partitioned(str(flux_dir), "transformer", FluxTransformer2DModel,
                             to_deepspeed_config(cfg, world_size=1), rank=0)
    assert isinstance(model, FluxTransformer2DModel)
    assert all(hasattr(param, "ds_id") for param in model.parameters())
    reference = FluxTransformer2DModel.from_pretrained(flux_dir / "transformer").state_dict()
    params = dict(model.named_parameters())
    with gathered(list(params.values())):
        assert all(torch.equal(param.data, reference[name]) for name, param in params.items())


def _memory_table():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "memory_table.py"
    spec = importlib.util.spec_from_file_location("memory_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("memory_table", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_memory_table_counts_what_deepspeed_leaves_out():
    table = _memory_table()
    counts = table.ModelCounts("m", params=8_000_000_000, largest_layer=50_000_000, lora=10_000_000, frozen=0)
    bucket = 2 * table.SETTINGS["reduce_bucket_size"]
    ds_gpu, _ = table.deepspeed_estimate(counts, "full", 8, 2, offload=False)
    ours_gpu, ours_host, load = table.account(counts, "full", 8, 2, offload=False)
    # Full ZeRO-2: the same 2 + 18/GPUs bytes a parameter as DeepSpeed, plus the gradient bucket.
    assert ds_gpu == 2 * counts.params + 18 * counts.params // 8 and ours_gpu == ds_gpu + bucket
    assert ours_host == 0 and load == 8 * 4 * counts.params  # each rank loads fp32 before the engine
    # LoRA: DeepSpeed sees only the adapters; we also hold the frozen bf16 base weights.
    ds_lora, _ = table.deepspeed_estimate(counts, "lora", 8, 2, offload=False)
    ours_lora = table.account(counts, "lora", 8, 2, offload=False)[0]
    assert ds_lora < 1e9 < 2 * counts.params <= ours_lora
    # ZeRO-3 with both offloads: the GPU keeps the gathered layers, the node its GPUs' partitions.
    gpu, host, load = table.account(counts, "full", 16, 3, offload=True)
    assert gpu == 4 * counts.largest_layer + bucket and host == 8 * 18 * counts.params / 16
    assert load == 4 * counts.largest_layer
