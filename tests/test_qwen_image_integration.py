"""Qwen-Image through the real `deepspeed` launcher on the Qwen-Image-shaped test model, 1 process: LoRA
under ZeRO-2 (saved at step 2 of 3, resumed from both encoder caches, equal losses and adapters to the
uncached straight run; the LoRA file loads in QwenImagePipeline.load_lora_weights and changes its
images), LoRA under ZeRO-3 as the preset runs it, and a full fine-tune under ZeRO-3, the transformer
loaded partitioned, with a validation grid (the export loads in QwenImagePipeline.from_pretrained and
differs from the base)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import assert_ok, launch, losses
# The same small run and pipeline call as FLUX.1's (16 rows at 64 px, 3 steps; 2 sampling steps).
from tests.test_flux_integration import flux_cfg as qwen_cfg
from tests.test_flux_integration import generate

pytestmark = pytest.mark.multiprocess


def test_lora_zero2_resumes_exactly_and_loads_in_qwen_image_pipeline(qwen_image_model, tiny_assets, tmp_path):
    lora = ("use_lora.action=true", "use_lora.rank=4", "use_lora.alpha=8", "optimizer.params.lr=0.01",
            "zero_optimization.stage=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(launch(qwen_cfg(qwen_image_model, tiny_assets.dataset_dir, straight, *lora, "save_interval=2")))
    # Resumed from the encoder caches (built at its start): the same numbers as the uncached straight run.
    result = launch(qwen_cfg(qwen_image_model, tiny_assets.dataset_dir, resumed, *lora, "cache_latents=true",
                             "cache_text_embeddings=true", f"resume_from_checkpoint={straight / 'checkpoints' / 'step_2'}"))
    assert_ok(result)
    assert "resumed from" in result.stdout + result.stderr
    history = losses(straight / "model")
    assert len(history) == 3 and all(math.isfinite(loss) for loss in history) and len(set(history)) == 3
    assert losses(resumed / "model") == pytest.approx(history[2:], abs=1e-6)
    weights = load_file(str(straight / "model" / "pytorch_lora_weights.safetensors"))
    again = load_file(str(resumed / "model" / "pytorch_lora_weights.safetensors"))
    assert weights.keys() == again.keys() and all(torch.allclose(weights[k], again[k], atol=1e-6) for k in weights)
    # diffusers' names for a Qwen-Image LoRA: peft's, under `transformer.`.
    assert all(key.startswith("transformer.transformer_blocks.") and (".lora_A." in key or ".lora_B." in key) for key in weights)
    assert any("attn.to_q.lora_B" in key and tensor.abs().max() > 0 for key, tensor in weights.items())

    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(qwen_image_model)
    before = generate(pipe)
    pipe.load_lora_weights(straight / "model")
    assert set(pipe.transformer.peft_config["default_0"].target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert abs(generate(pipe) - before).max() > 1e-4


def test_full_zero3_loads_partitioned_validates_and_exports_a_qwen_image_pipeline(qwen_image_model, tiny_assets, tmp_path):
    result = launch(qwen_cfg(qwen_image_model, tiny_assets.dataset_dir, tmp_path, "zero_optimization.stage=3",
                             "optimizer.params.lr=1e-3", "validation_steps=3", "num_validation_images=1",
                             "validation_inference_steps=2", "validation_prompts=[\"a red circle\"]"))
    assert_ok(result)
    assert "full transformer" in result.stdout and "loaded partitioned" in result.stdout
    assert (tmp_path / "model" / "validation" / "step_000003.png").stat().st_size > 0
    history = losses(tmp_path / "model")
    assert len(history) == 3 and all(math.isfinite(loss) for loss in history) and len(set(history)) == 3

    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    pipe = QwenImagePipeline.from_pretrained(tmp_path / "model")
    base = QwenImageTransformer2DModel.from_pretrained(qwen_image_model / "transformer").state_dict()
    tuned = pipe.transformer.state_dict()
    assert tuned.keys() == base.keys()
    changes = [(tuned[name] - base[name]).abs().max().item() for name in base]
    # Trained (every weight moved by Adam) but from the base weights, not zero.Init's random ones.
    assert 0 < max(changes) < 0.05 and sum(change > 0 for change in changes) > len(changes) // 2
    assert generate(pipe).std() > 0


def test_lora_zero3_as_the_preset_trains_on_the_partitioned_transformer(qwen_image_model, tiny_assets, tmp_path):
    # cfg/qwen_image_lora.json's stage: the frozen 20B base partitioned, the adapters trained and saved.
    result = launch(qwen_cfg(qwen_image_model, tiny_assets.dataset_dir, tmp_path, "use_lora.action=true", "use_lora.rank=4",
                             "optimizer.params.lr=0.01", "zero_optimization.stage=3", "gradient_checkpointing=true"))
    assert_ok(result)
    assert "LoRA" in result.stdout and "loaded partitioned" in result.stdout
    history = losses(tmp_path / "model")
    assert len(history) == 3 and all(math.isfinite(loss) for loss in history) and len(set(history)) == 3
    weights = load_file(str(tmp_path / "model" / "pytorch_lora_weights.safetensors"))
    assert len(weights) == 2 * 4 * 2 and any(".lora_B." in key and tensor.abs().max() > 0 for key, tensor in weights.items())
