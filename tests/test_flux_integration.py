"""FLUX.1 through DeepSpeed's launcher on the FLUX.1 [dev]-shaped test model, 1 process: LoRA
under ZeRO-2 (saved at step 2 of 3, resumed from both encoder caches, equal losses and adapters to the
uncached straight run; the LoRA file loads in
FluxPipeline.load_lora_weights and changes its images) and a full fine-tune under ZeRO-3, the
transformer loaded partitioned from its shards, with a validation grid (the export loads in
FluxPipeline.from_pretrained, differs from the base, equals the offline export of the last checkpoint,
and `python -m ds_diffusers.sample` draws it beside the baseline)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import (REPO, assert_lora_loads_and_changes_images, assert_trained_from, full_transformer_run,
                           lora_resumed_from_caches, sample_64px, transformer_run_cfg)

pytestmark = pytest.mark.multiprocess


def test_lora_zero2_resumes_exactly_and_loads_in_flux_pipeline(flux_model, tiny_assets, tmp_path):
    weights = lora_resumed_from_caches(flux_model, tiny_assets.dataset_dir, tmp_path)
    # diffusers' names for a Flux LoRA: peft's, under `transformer.`, in both kinds of block.
    assert all(key.startswith("transformer.") and (".lora_A." in key or ".lora_B." in key) for key in weights)
    assert any(key.startswith("transformer.single_transformer_blocks.") for key in weights)
    assert any("attn.add_q_proj.lora_B" in key and tensor.abs().max() > 0 for key, tensor in weights.items())

    from diffusers import FluxPipeline

    assert_lora_loads_and_changes_images(FluxPipeline.from_pretrained(flux_model), tmp_path / "straight" / "model", 8)


def test_full_zero3_loads_partitioned_validates_and_exports_a_flux_pipeline(flux_model, tiny_assets, tmp_path):
    full_transformer_run(flux_model, tiny_assets.dataset_dir, tmp_path)

    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe = FluxPipeline.from_pretrained(tmp_path / "model")
    base = FluxTransformer2DModel.from_pretrained(flux_model / "transformer").state_dict()
    assert_trained_from(base, pipe.transformer.state_dict())
    assert sample_64px(pipe).std() > 0

    # The offline export of the last ZeRO-3 checkpoint writes the same transformer, byte for byte.
    offline = subprocess.run([sys.executable, "-m", "ds_diffusers.export", "--checkpoint", str(tmp_path / "checkpoints"),
                              "--out", str(tmp_path / "offline")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert offline.returncode == 0, offline.stdout[-3000:] + offline.stderr[-3000:]
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "offline" / weights).read_bytes() == (tmp_path / "model" / weights).read_bytes()

    # scripts/test_text_to_image.sh's entrypoint: baseline against the exported transformer, same noise.
    samples = tmp_path / "samples"
    sample_args = [*transformer_run_cfg(flux_model, tiny_assets.dataset_dir, tmp_path), "sample.prompts=[\"a red circle\"]",
                   "sample.weights=[\"baseline\", \"tuned\"]", "sample.num_inference_steps=2",
                   "sample.num_images_per_prompt=1", f"sample.output_dir={samples}"]
    sampled = subprocess.run([sys.executable, "-m", "ds_diffusers.sample", "--cfg", "cfg/default.json", "--set", *sample_args],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0, sampled.stdout[-3000:] + sampled.stderr[-3000:]
    assert "flow-matching Euler" in sampled.stdout
    manifest = json.loads((samples / "manifest.json").read_text())
    pngs = {image["weight"]: (samples / image["file"]).read_bytes() for image in manifest["images"]}
    assert set(pngs) == {"baseline", "tuned"} and pngs["baseline"] != pngs["tuned"]
