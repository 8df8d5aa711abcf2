"""Qwen-Image through DeepSpeed's launcher on the Qwen-Image-shaped test model, 1 process: LoRA
under ZeRO-2 (saved at step 2 of 3, resumed from both encoder caches, equal losses and adapters to the
uncached straight run; the LoRA file loads in QwenImagePipeline.load_lora_weights and changes its
images), and a full fine-tune under ZeRO-3, the transformer loaded partitioned, with a validation grid
(the export loads in QwenImagePipeline.from_pretrained and differs from the base). LoRA under ZeRO-3 as
the preset runs it (with gradient checkpointing), 2 processes and ZeRO-0/1 are in
tests/test_transformer_processes.py."""

from __future__ import annotations

import pytest

from tests.helpers import (assert_lora_loads_and_changes_images, assert_trained_from, full_transformer_run,
                           lora_resumed_from_caches, sample_64px)

pytestmark = pytest.mark.multiprocess


def test_lora_zero2_resumes_exactly_and_loads_in_qwen_image_pipeline(qwen_image_model, tiny_assets, tmp_path):
    weights = lora_resumed_from_caches(qwen_image_model, tiny_assets.dataset_dir, tmp_path)
    # diffusers' names for a Qwen-Image LoRA: peft's, under `transformer.`.
    assert all(key.startswith("transformer.transformer_blocks.") and (".lora_A." in key or ".lora_B." in key) for key in weights)
    assert any("attn.to_q.lora_B" in key and tensor.abs().max() > 0 for key, tensor in weights.items())

    from diffusers import QwenImagePipeline

    assert_lora_loads_and_changes_images(QwenImagePipeline.from_pretrained(qwen_image_model), tmp_path / "straight" / "model", 4)


def test_full_zero3_loads_partitioned_validates_and_exports_a_qwen_image_pipeline(qwen_image_model, tiny_assets, tmp_path):
    full_transformer_run(qwen_image_model, tiny_assets.dataset_dir, tmp_path)

    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    pipe = QwenImagePipeline.from_pretrained(tmp_path / "model")
    base = QwenImageTransformer2DModel.from_pretrained(qwen_image_model / "transformer").state_dict()
    assert_trained_from(base, pipe.transformer.state_dict())
    assert sample_64px(pipe).std() > 0
