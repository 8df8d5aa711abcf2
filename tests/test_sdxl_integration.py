"""SDXL through DeepSpeed's launcher on the SDXL-shaped test model, few and short runs that
together cover full and LoRA × 1 and 2 processes × ZeRO-2 and ZeRO-3: LoRA with 2 processes under
ZeRO-3 (save mid-way, resume, compare, export, sample), a full fine-tune with 2 processes under ZeRO-2
with both caches, EMA and a validation grid, a full fine-tune with 2 processes under ZeRO-3 (resumed
exactly), and with 1 process a full fine-tune under ZeRO-3 and LoRA under ZeRO-2. Every export must
load in StableDiffusionXLPipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ds_diffusers.data.file_digests import DIGESTS_FILE
from tests.helpers import REPO, assert_ok, launch, losses

pytestmark = pytest.mark.multiprocess


def sdxl_cfg(model_dir: Path, dataset_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [f"pretrained_model_name_or_path={model_dir}", f"dataset_dir={dataset_dir}", f"output_dir={run_dir / 'model'}",
            f"checkpoint_dir={run_dir / 'checkpoints'}", "resolution=64", "train_micro_batch_size_per_gpu=4",
            "validation_steps=0", "save_interval=0", "lr_warmup_steps=1", "log_every_n_steps=1", "scheduler.params={}", *overrides]


def generate(pipe, steps: int = 2):
    return pipe("a red circle", negative_prompt="a blue square", num_inference_steps=steps, height=64, width=64,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_lora_two_process_zero3_resumes_exactly_exports_and_samples(sdxl_model, tiny_assets, tmp_path):  # noqa: F811
    # Saved at step 2 of 3: the resumed run makes one step (a ZeRO-3 process's second step is its
    # slowest on a CPU) that must equal the straight run's third in loss and weights.
    lora = ("use_lora.action=true", "use_lora.rank=4", "use_lora.alpha=8", "optimizer.params.lr=0.01", "zero_optimization.stage=3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(launch(sdxl_cfg(sdxl_model, tiny_assets.dataset_dir, straight, *lora, "max_train_steps=3", "save_interval=2"), procs=2))
    result = launch(sdxl_cfg(sdxl_model, tiny_assets.dataset_dir, resumed, *lora, "max_train_steps=3",
                             f"resume_from_checkpoint={straight / 'checkpoints' / 'step_2'}",
                             f"checkpoint_dir={resumed / 'checkpoints'}"), procs=2)
    assert_ok(result)
    assert "resumed from" in result.stdout + result.stderr
    assert len(losses(straight / "model")) == 3 and len(losses(resumed / "model")) == 1
    assert losses(straight / "model")[2:] == pytest.approx(losses(resumed / "model"), abs=1e-6)
    weights = load_file(str(straight / "model" / "pytorch_lora_weights.safetensors"))
    again = load_file(str(resumed / "model" / "pytorch_lora_weights.safetensors"))
    assert weights.keys() == again.keys() and all(torch.allclose(weights[k], again[k], atol=1e-6) for k in weights)
    assert any("attentions" in k and ("lora_B" in k or "lora.up" in k) and t.abs().max() > 0 for k, t in weights.items())

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_model)
    before = generate(pipe)
    pipe.load_lora_weights(straight / "model")
    assert abs(generate(pipe) - before).max() > 1e-4

    # Sampling: baseline and two LoRAs combined, negative prompt, guidance, an ancestral sampler.
    samples = tmp_path / "samples"
    sample_args = [*sdxl_cfg(sdxl_model, tiny_assets.dataset_dir, straight), "sample.prompts=[\"a red circle\", \"a blue square\"]",
                   "sample.weights=[\"baseline\", \"lora\"]", "sample.negative_prompt=a green triangle",
                   "sample.scheduler=euler_ancestral", "sample.guidance_scale=5.0", "sample.num_inference_steps=3",
                   "sample.num_images_per_prompt=1", f"sample.output_dir={samples}",
                   f"sample.loras=[{{\"path\": \"{straight / 'model'}\", \"weight\": 0.7}}, {{\"path\": \"{resumed / 'model'}\", \"weight\": 0.3}}]"]
    sampled = subprocess.run([sys.executable, "-m", "ds_diffusers.sample", "--cfg", "cfg/default.json", "--set", *sample_args],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0, sampled.stdout[-3000:] + sampled.stderr[-3000:]
    manifest = json.loads((samples / "manifest.json").read_text())
    assert len(manifest["images"]) == 4 and len(manifest["weights"][1]["loras"]) == 2
    pngs = {image["weight"]: (samples / image["file"]).read_bytes() for image in manifest["images"] if image["prompt_index"] == 0}
    assert pngs["baseline"] != pngs["lora"]


def test_full_two_process_zero2_with_caches_ema_and_validation(sdxl_model, tiny_assets, tmp_path):  # noqa: F811
    overrides = sdxl_cfg(sdxl_model, tiny_assets.dataset_dir, tmp_path, "zero_optimization.stage=2", "max_train_steps=4",
                         "cache_latents=true", "cache_text_embeddings=true", f"cache_dir={tmp_path / 'cache'}", "center_crop=true",
                         "use_ema=true", "ema_decay=0.5", "validation_steps=4", "num_validation_images=1",
                         "validation_inference_steps=2", "validation_prompts=[\"a red circle\"]")
    assert_ok(launch(overrides, procs=2))
    history = losses(tmp_path / "model")
    assert len(history) == 4 and all(0 < loss < 10 for loss in history)
    assert (tmp_path / "model" / "validation" / "step_000004.png").stat().st_size > 0
    cached = {p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if p.name not in (DIGESTS_FILE, "datasets")}
    # cache_dir/datasets holds the Arrow cache of the dataset load; prompts/ the text pre-pass's validation prompts
    assert cached == {"latents", "text", "prompts"}
    assert_sdxl_export_loads(tmp_path / "model", sdxl_model)
    ema = load_file(str(tmp_path / "model" / "unet_ema" / "diffusion_pytorch_model.safetensors"))
    tuned = load_file(str(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(ema[k], tuned[k]) for k in tuned)


def test_full_two_process_zero3_loads_partitioned_and_resumes_exactly(sdxl_model, tiny_assets, tmp_path):  # noqa: F811
    # ZeRO-3 builds the UNet partitioned and fills it from the file (`zero_load`): the export after
    # two small Adam steps must still be the base model's weights, not zero.Init's random ones.
    full = ("zero_optimization.stage=3", "max_train_steps=2", "optimizer.params.lr=1e-4")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = launch(sdxl_cfg(sdxl_model, tiny_assets.dataset_dir, straight, *full, "save_interval=1"), procs=2)
    assert_ok(first)
    assert "ZeRO-3 (unet loaded partitioned)" in first.stdout + first.stderr
    assert_ok(launch(sdxl_cfg(sdxl_model, tiny_assets.dataset_dir, resumed, *full,
                              f"resume_from_checkpoint={straight / 'checkpoints' / 'step_1'}"), procs=2))
    assert losses(straight / "model")[1:] == pytest.approx(losses(resumed / "model"), abs=1e-6)
    unet_file = Path("unet") / "diffusion_pytorch_model.safetensors"
    exported, again = load_file(str(straight / "model" / unet_file)), load_file(str(resumed / "model" / unet_file))
    assert all(torch.allclose(exported[k], again[k], atol=1e-6) for k in exported)
    base = load_file(str(sdxl_model / unet_file))
    assert max((exported[k] - base[k]).abs().max().item() for k in base) < 0.01
    assert_sdxl_export_loads(straight / "model", sdxl_model)


def test_one_process_full_zero3_and_lora_zero2_export_loadable_folders(sdxl_model, tiny_assets, tmp_path):  # noqa: F811
    full, lora = tmp_path / "full", tmp_path / "lora"
    assert_ok(launch(sdxl_cfg(sdxl_model, tiny_assets.dataset_dir, full, "zero_optimization.stage=3", "max_train_steps=2")))
    assert len(losses(full / "model")) == 2
    assert_sdxl_export_loads(full / "model", sdxl_model)
    assert_ok(launch(sdxl_cfg(sdxl_model, tiny_assets.dataset_dir, lora, "use_lora.action=true", "use_lora.rank=4",
                              "optimizer.params.lr=0.01", "zero_optimization.stage=2", "max_train_steps=2")))
    assert len(losses(lora / "model")) == 2
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_model)
    before = generate(pipe)
    pipe.load_lora_weights(lora / "model")
    assert abs(generate(pipe) - before).max() > 1e-4


def assert_sdxl_export_loads(out_dir: Path, base_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    pipe = StableDiffusionXLPipeline.from_pretrained(out_dir)
    assert generate(pipe).shape == (1, 64, 64, 3)
    base = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    changed = [not torch.equal(p, q) for p, q in zip(base.parameters(), pipe.unet.parameters())]
    assert sum(changed) > 0.9 * len(changed), "export does not hold the trained weights"
