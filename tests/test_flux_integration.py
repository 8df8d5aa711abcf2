"""FLUX.1 through the real `deepspeed` launcher on the FLUX.1 [dev]-shaped test model, 1 process: LoRA
under ZeRO-2 (saved at step 2 of 3, resumed from both encoder caches, equal losses and adapters to the
uncached straight run; the LoRA file loads in
FluxPipeline.load_lora_weights and changes its images) and a full fine-tune under ZeRO-3, the
transformer loaded partitioned from its shards, with a validation grid (the export loads in
FluxPipeline.from_pretrained, differs from the base, equals the offline export of the last checkpoint,
and `python -m ds_diffusers.sample` draws it beside the baseline)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, assert_ok, launch, losses

pytestmark = pytest.mark.multiprocess


def flux_cfg(model_dir: Path, dataset_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [f"pretrained_model_name_or_path={model_dir}", f"dataset_dir={dataset_dir}", f"output_dir={run_dir / 'model'}",
            f"checkpoint_dir={run_dir / 'checkpoints'}", f"cache_dir={run_dir / 'cache'}", "resolution=64",
            "train_micro_batch_size_per_gpu=4", "validation_steps=0", "save_interval=0", "lr_warmup_steps=1",
            "log_every_n_steps=1", "scheduler.params={}", "max_train_steps=3",
            "max_train_samples=16", *overrides]  # 16 rows: the resumed run's caches encode only those


def generate(pipe):
    return pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_lora_zero2_resumes_exactly_and_loads_in_flux_pipeline(flux_model, tiny_assets, tmp_path):
    lora = ("use_lora.action=true", "use_lora.rank=4", "use_lora.alpha=8", "optimizer.params.lr=0.01",
            "zero_optimization.stage=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(launch(flux_cfg(flux_model, tiny_assets.dataset_dir, straight, *lora, "save_interval=2")))
    # Resumed from the encoder caches (built at its start): the same numbers as the uncached straight run.
    result = launch(flux_cfg(flux_model, tiny_assets.dataset_dir, resumed, *lora, "cache_latents=true",
                             "cache_text_embeddings=true", f"resume_from_checkpoint={straight / 'checkpoints' / 'step_2'}"))
    assert_ok(result)
    assert "resumed from" in result.stdout + result.stderr
    history = losses(straight / "model")
    assert len(history) == 3 and all(math.isfinite(loss) for loss in history) and len(set(history)) == 3
    assert losses(resumed / "model") == pytest.approx(history[2:], abs=1e-6)
    weights = load_file(str(straight / "model" / "pytorch_lora_weights.safetensors"))
    again = load_file(str(resumed / "model" / "pytorch_lora_weights.safetensors"))
    assert weights.keys() == again.keys() and all(torch.allclose(weights[k], again[k], atol=1e-6) for k in weights)
    # diffusers' names for a Flux LoRA: peft's, under `transformer.`, in both kinds of block.
    assert all(key.startswith("transformer.") and (".lora_A." in key or ".lora_B." in key) for key in weights)
    assert any(key.startswith("transformer.single_transformer_blocks.") for key in weights)
    assert any("attn.add_q_proj.lora_B" in key and tensor.abs().max() > 0 for key, tensor in weights.items())

    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_model)
    before = generate(pipe)
    pipe.load_lora_weights(straight / "model")
    assert len(pipe.transformer.peft_config["default_0"].target_modules) == 8
    assert abs(generate(pipe) - before).max() > 1e-4


def test_full_zero3_loads_partitioned_validates_and_exports_a_flux_pipeline(flux_model, tiny_assets, tmp_path):
    result = launch(flux_cfg(flux_model, tiny_assets.dataset_dir, tmp_path, "zero_optimization.stage=3",
                             "optimizer.params.lr=1e-3", "validation_steps=3", "num_validation_images=1",
                             "validation_inference_steps=2", "validation_prompts=[\"a red circle\"]"))
    assert_ok(result)
    assert "full transformer" in result.stdout and "loaded partitioned" in result.stdout
    assert (tmp_path / "model" / "validation" / "step_000003.png").stat().st_size > 0
    history = losses(tmp_path / "model")
    assert len(history) == 3 and all(math.isfinite(loss) for loss in history) and len(set(history)) == 3

    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe = FluxPipeline.from_pretrained(tmp_path / "model")
    base = FluxTransformer2DModel.from_pretrained(flux_model / "transformer").state_dict()
    tuned = pipe.transformer.state_dict()
    assert tuned.keys() == base.keys()
    changes = [(tuned[name] - base[name]).abs().max().item() for name in base]
    # Trained (every weight moved by Adam) but from the base weights, not zero.Init's random ones.
    assert 0 < max(changes) < 0.05 and sum(change > 0 for change in changes) > len(changes) // 2
    assert generate(pipe).std() > 0

    # The offline export of the last ZeRO-3 checkpoint writes the same transformer, byte for byte.
    offline = subprocess.run([sys.executable, "-m", "ds_diffusers.export", "--checkpoint", str(tmp_path / "checkpoints"),
                              "--out", str(tmp_path / "offline")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert offline.returncode == 0, offline.stdout[-3000:] + offline.stderr[-3000:]
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "offline" / weights).read_bytes() == (tmp_path / "model" / weights).read_bytes()

    # scripts/test_text_to_image.sh's entrypoint: baseline against the exported transformer, same noise.
    samples = tmp_path / "samples"
    sample_args = [*flux_cfg(flux_model, tiny_assets.dataset_dir, tmp_path), "sample.prompts=[\"a red circle\"]",
                   "sample.weights=[\"baseline\", \"tuned\"]", "sample.num_inference_steps=2",
                   "sample.num_images_per_prompt=1", f"sample.output_dir={samples}"]
    sampled = subprocess.run([sys.executable, "-m", "ds_diffusers.sample", "--cfg", "cfg/default.json", "--set", *sample_args],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0, sampled.stdout[-3000:] + sampled.stderr[-3000:]
    assert "flow-matching Euler" in sampled.stdout
    manifest = json.loads((samples / "manifest.json").read_text())
    pngs = {image["weight"]: (samples / image["file"]).read_bytes() for image in manifest["images"]}
    assert set(pngs) == {"baseline", "tuned"} and pngs["baseline"] != pngs["tuned"]
