"""The features of the tiny-model integration tests, through the real launcher, on the SD 1.5- and
SD 2.x-shaped models (`embedded.arch_sd`): few combined runs, so the suite stays inside its budget.

SD 1.5: 2-process ZeRO-3 full fine-tune with EMA, both caches, a validation grid and the held-out
loss, resumed exactly, exported at the end and offline; the LoRA preset with gradient checkpointing, sampled.
SD 2.x (v-prediction, linear projections, per-block heads): its preset, cached, exported, sampled.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ds_diffusers.embedded.arch_sd import TEST_RESOLUTION
from tests.helpers import (REPO, assert_ok, launch, losses, max_diff, read_manifest, run_cfg, run_sample, tensors, three_runs,
                           validation_losses)

pytestmark = pytest.mark.multiprocess
UNET_FILE = Path("diffusion_pytorch_model.safetensors")
STEPS = 4
SHAPE = (f"resolution={TEST_RESOLUTION}", "train_micro_batch_size_per_gpu=4")
VALIDATION = ('validation_prompts=["a red circle"]', "num_validation_images=1", "validation_inference_steps=2")


def caches(tmp_path: Path) -> tuple[str, ...]:
    return ("cache_latents=true", "cache_text_embeddings=true", f"cache_dir={tmp_path / 'cache'}")


def assert_pipeline_generates(model_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, height=TEST_RESOLUTION, width=TEST_RESOLUTION, output_type="np").images[0]
    assert image.shape == (TEST_RESOLUTION, TEST_RESOLUTION, 3) and np.isfinite(image).all()


def sample_weights(assets, cfg: str, output_dir: Path, samples: Path, *extra: str) -> dict:
    """`python -m ds_diffusers.sample --cfg cfg` baseline vs tuned; returns the manifest."""
    run_sample([f"pretrained_model_name_or_path={assets.model_dir}", f"dataset_dir={assets.dataset_dir}",
                f"output_dir={output_dir}", f"sample.output_dir={samples}", 'sample.prompts=["a red circle", "a blue square"]',
                "sample.num_images_per_prompt=1", "sample.num_inference_steps=2", f"sample.resolution={TEST_RESOLUTION}", *extra], cfg=cfg)
    manifest = read_manifest(samples)
    assert len(manifest["images"]) == 2 * 2
    by_weight = {}
    for image in manifest["images"]:
        by_weight.setdefault(image["weight"], []).append(image["sha256"])
    assert by_weight["baseline"] != by_weight["tuned"], "the tuned weights did not change the images"
    return manifest


def test_sd15_zero3_full_ema_cached_resume_is_exact_and_exports(sd15_assets, tmp_path):
    """2 + 2 steps (a 2-process ZeRO-3 step is the slowest thing in the suite on a CPU), validating at
    steps 2 and 4 with the held-out loss on too: it leaves the training streams alone, and the resumed
    run's value at step 4 equals the straight run's (its step 2 is kept from the first part)."""
    straight, resumed = three_runs(sd15_assets, tmp_path, "zero_optimization.stage=3", "use_ema=true", "ema_decay=0.9",
                                   *SHAPE, *caches(tmp_path), "validation_steps=2", "validation_split=5", *VALIDATION,
                                   steps=STEPS)
    a, b = losses(straight), losses(resumed)
    assert len(a) == len(b) == STEPS and all(np.isfinite(a))
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    val_a, val_b = validation_losses(straight), validation_losses(resumed)
    assert sorted(val_a) == sorted(val_b) == [2, 4]
    assert max(abs(val_a[step] - val_b[step]) for step in val_a) <= 1e-6
    assert len(set(val_a.values())) == 2  # the weights changed between validations, and so did the loss
    for sub in ("unet", "unet_ema"):
        assert max_diff(tensors(straight / sub / UNET_FILE), tensors(resumed / sub / UNET_FILE)) <= 1e-6, sub
    assert max_diff(tensors(resumed / "unet" / UNET_FILE), tensors(resumed / "unet_ema" / UNET_FILE)) > 1e-6
    assert len(list((tmp_path / "cache").glob("latents-*"))) == len(list((tmp_path / "cache").glob("text-*"))) == 1
    assert (straight / "validation" / f"step_{STEPS:06d}.png").stat().st_size > 0
    assert_pipeline_generates(straight)

    offline = tmp_path / "offline"
    result = subprocess.run([sys.executable, "-m", "ds_diffusers.export", "--checkpoint", str(tmp_path / "resumed" / "checkpoints"),
                             "--out", str(offline)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for sub in ("unet", "unet_ema"):
        assert max_diff(tensors(offline / sub / UNET_FILE), tensors(resumed / sub / UNET_FILE)) == 0.0, sub


def test_sd15_lora_preset_with_gradient_checkpointing_trains_and_samples(sd15_assets, tmp_path):
    # cfg/sd15_lora.json (rank 32, min-SNR, cosine schedule, ZeRO-2, data workers), shrunk; fp32 as the CPU has no fp16.
    overrides = run_cfg(sd15_assets, tmp_path, *SHAPE, "max_train_steps=6", "lr_warmup_steps=1", "use_fp16.enabled=false",
                        "resume_from_checkpoint=false", "dataloader_num_workers=1", "gradient_checkpointing=true",
                        "optimizer.params.lr=0.01")
    assert_ok(launch(overrides, cfg="cfg/sd15_lora.json"))
    history = losses(tmp_path / "model")
    assert len(history) == 6 and all(np.isfinite(history))
    assert not (tmp_path / "model" / "unet").exists()
    lora = tensors(tmp_path / "model" / "pytorch_lora_weights.safetensors")
    assert any(t.abs().max() > 0 for k, t in lora.items() if "lora_B" in k or "lora.up" in k)  # adapters trained
    manifest = sample_weights(sd15_assets, "cfg/sd15_lora.json", tmp_path / "model", tmp_path / "samples")
    assert manifest["weights"][1]["loras"], "tuned must be the LoRA export on the base UNet"


def test_sd2_preset_cached_full_finetune_exports_and_samples(sd2_assets, tmp_path):
    # cfg/sd2_768.json (v-prediction, noise offset, gradient checkpointing, accumulation, cosine), shrunk; fp32:
    # in bf16 on this CPU the latent cache alone ran past the launch timeout.
    overrides = run_cfg(sd2_assets, tmp_path, *SHAPE, *caches(tmp_path), "max_train_steps=4", "gradient_accumulation_steps=2",
                        "lr_warmup_steps=1", "imagefolder=false", "resume_from_checkpoint=false", "bf16.enabled=false")
    assert_ok(launch(overrides, cfg="cfg/sd2_768.json"))
    assert all(np.isfinite(losses(tmp_path / "model")))
    exported = tmp_path / "model"
    assert json.loads((exported / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert json.loads((exported / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"] == "!"
    assert_pipeline_generates(exported)
    sample_weights(sd2_assets, "cfg/sd2_768.json", exported, tmp_path / "samples", "sample.scheduler=euler", "bf16.enabled=false")
