"""SD 3.5 through DeepSpeed's launcher on the SD 3.5 Medium-shaped test model, 1 process: LoRA
under ZeRO-2 (saved at step 2 of 3, resumed from both encoder caches, equal losses and adapters to the
uncached straight run; the LoRA file loads in StableDiffusion3Pipeline.load_lora_weights and changes its
images) and a full fine-tune under ZeRO-3 with EMA, the transformer loaded partitioned, with a validation
grid (the export and its `transformer_ema/` load in StableDiffusion3Pipeline.from_pretrained and differ
from the base; `python -m ds_diffusers.sample` draws base, export and EMA with a negative prompt and clip skip)."""

from __future__ import annotations


import pytest
import torch

from tests.helpers import (assert_lora_loads_and_changes_images, assert_trained_from, full_transformer_run,
                           lora_resumed_from_caches, read_manifest, run_sample, sample_64px, transformer_run_cfg)

pytestmark = pytest.mark.multiprocess


def test_lora_zero2_resumes_exactly_and_loads_in_sd3_pipeline(sd3_model, tiny_assets, tmp_path):
    weights = lora_resumed_from_caches(sd3_model, tiny_assets.dataset_dir, tmp_path)
    # diffusers' names for an SD3 LoRA: peft's, under `transformer.`, both streams of the joint attention.
    assert all(key.startswith("transformer.") and (".lora_A." in key or ".lora_B." in key) for key in weights)
    assert any("attn.add_q_proj.lora_B" in key and tensor.abs().max() > 0 for key, tensor in weights.items())
    assert not any(".attn2." in key for key in weights)

    from diffusers import StableDiffusion3Pipeline

    assert_lora_loads_and_changes_images(StableDiffusion3Pipeline.from_pretrained(sd3_model), tmp_path / "straight" / "model", 8)


def test_full_zero3_with_ema_loads_partitioned_validates_and_exports_an_sd3_pipeline(sd3_model, tiny_assets, tmp_path):
    full_transformer_run(sd3_model, tiny_assets.dataset_dir, tmp_path, "use_ema=true", "ema_decay=0.5")

    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "model")
    base = SD3Transformer2DModel.from_pretrained(sd3_model / "transformer").state_dict()
    tuned = pipe.transformer.state_dict()
    assert_trained_from(base, tuned)
    assert sample_64px(pipe).std() > 0
    assert (tmp_path / "model" / "text_encoder_3").is_dir() and pipe.text_encoder_3 is not None  # T5 copied too
    # The EMA export: the same layout beside it, its weights neither the base's nor the trained ones.
    ema = SD3Transformer2DModel.from_pretrained(tmp_path / "model", subfolder="transformer_ema").state_dict()
    assert ema.keys() == base.keys()
    assert any(not torch.equal(ema[name], tuned[name]) for name in base)
    assert any(not torch.equal(ema[name], base[name]) for name in base)

    # `python -m ds_diffusers.sample`: base, export and EMA with the same noise, through the pipeline's negative
    # prompt and clip skip (StableDiffusion3Pipeline takes both).
    samples = tmp_path / "samples"
    sampled = run_sample([*transformer_run_cfg(sd3_model, tiny_assets.dataset_dir, tmp_path), "sample.prompts=[\"a red circle\"]",
                          "sample.weights=[\"baseline\", \"tuned\", \"ema\"]", "sample.num_inference_steps=2",
                          "sample.num_images_per_prompt=1", "sample.negative_prompt=blurry", "sample.clip_skip=1",
                          f"sample.output_dir={samples}"])
    assert "flow-matching Euler" in sampled.stdout
    pngs = {image["weight"]: (samples / image["file"]).read_bytes() for image in read_manifest(samples)["images"]}
    assert set(pngs) == {"baseline", "tuned", "ema"} and pngs["baseline"] != pngs["tuned"]
