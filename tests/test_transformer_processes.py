"""The flow-matching transformer families (FLUX.1, SD 3.5, Qwen-Image) beyond one process and ZeRO-2: each family's
test model through DeepSpeed's launcher (the one-process LoRA-resume and ZeRO-3 export tests are
in tests/test_<family>_integration.py).

- 2 processes, full fine-tune under ZeRO-3 with the optimizer offloaded to the CPU, bf16 and EMA:
  saved at step 2 of 3 and resumed on 2 processes, the resumed run's loss and exported transformer
  equal the straight run's; the EMA export (`transformer_ema/`) loads and is not the trained weights.
  A validation grid is drawn with the EMA weights swapped in.
- 2 processes, LoRA under ZeRO-3 with gradient checkpointing, as the presets run it (the base
  transformer partitioned, the adapters trained): the LoRA file loads in the family pipeline's
  `load_lora_weights`, and is sampled on 2 processes with two LoRA files combined, beside the
  baseline, into a grid; and LoRA under ZeRO-2 from both encoder caches, the text encoders freed and
  a validation grid drawn from the stored prompt embeddings.
- 1 process, LoRA at ZeRO-1 (bf16): trains and exports adapters under `transformer.`. (One process
  runs ZeRO-2 as ZeRO-1, so ZeRO-2 is run on two; ZeRO-0 in fp32 is the family's LoRA resume test.)
These paths are the engine's, not the family's; they run for every family because a family's
conditioning and LoRA targets reach each of them (partitioned load, EMA swap, adapters' export).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import assert_ok, launch, losses, max_diff, read_manifest, run_sample, tensors, transformer_run_cfg

pytestmark = pytest.mark.multiprocess

LORA = ("use_lora.action=true", "use_lora.rank=4", "use_lora.alpha=8", "optimizer.params.lr=0.01")
# family -> (its test model's fixture, pipeline class, transformer class, default LoRA target count)
FAMILIES = {
    "flux": ("flux_model", "FluxPipeline", "FluxTransformer2DModel", 8),
    "sd3": ("sd3_model", "StableDiffusion3Pipeline", "SD3Transformer2DModel", 8),
    "qwen_image": ("qwen_image_model", "QwenImagePipeline", "QwenImageTransformer2DModel", 4),
}


def model_of(request, family: str) -> Path:
    return request.getfixturevalue(FAMILIES[family][0])


def diffusers_class(family: str, index: int):
    import diffusers

    return getattr(diffusers, FAMILIES[family][index])


def transformer_weights(family: str, folder: Path) -> dict[str, torch.Tensor]:
    model = diffusers_class(family, 2).from_pretrained(folder)
    return {name: tensor.float() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_zero3_offload_bf16_ema_resumes_exactly_on_two_processes(request, family, tiny_assets, tmp_path):
    model = model_of(request, family)
    full = ("zero_optimization.stage=3", "zero_optimization.offload_optimizer.device=cpu", "bf16.enabled=true",
            "use_ema=true", "ema_decay=0.5", "optimizer.params.lr=1e-3", "save_interval=2", "validation_steps=2",
            "validation_use_ema=true", "num_validation_images=1", "validation_inference_steps=2",
            "validation_prompts=[\"a red circle\"]")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = launch(transformer_run_cfg(model, tiny_assets.dataset_dir, straight, *full), procs=2)
    assert_ok(first)
    assert "full transformer" in first.stdout and "ZeRO-3 (transformer loaded partitioned)" in first.stdout
    assert "2 process(es)" in first.stdout
    # A validation grid under ZeRO-3 on 2 processes, drawn with the EMA weights swapped in.
    assert (straight / "model" / "validation" / "step_000002.png").stat().st_size > 0
    again = launch(transformer_run_cfg(model, tiny_assets.dataset_dir, resumed, *full,
                                       f"resume_from_checkpoint={straight / 'checkpoints' / 'step_2'}"), procs=2)
    assert_ok(again)
    history = losses(straight / "model")
    assert len(history) == 3 and all(math.isfinite(loss) for loss in history)
    assert losses(resumed / "model") == pytest.approx(history[2:], abs=1e-6)

    trained = transformer_weights(family, straight / "model" / "transformer")
    # As the SD resume tests allow: 1 ulp of fp32 (the losses themselves are equal to the bit here).
    assert max_diff(trained, transformer_weights(family, resumed / "model" / "transformer")) <= 1e-6
    assert max_diff(trained, transformer_weights(family, model / "transformer")) > 0  # it trained
    ema = transformer_weights(family, straight / "model" / "transformer_ema")
    assert ema.keys() == trained.keys() and max_diff(ema, trained) > 0


# Both caches and a validation grid: every family draws it from the prompt cache, its text encoders freed.
CACHED = ("cache_latents=true", "cache_text_embeddings=true", "validation_steps=2", "validation_prompts=[\"a red circle\"]",
          "num_validation_images=1", "validation_inference_steps=2")


@pytest.mark.parametrize("family, stage, extra",
                         [*((family, 2, CACHED) for family in FAMILIES),
                          *((family, 3, ("gradient_checkpointing=true",)) for family in FAMILIES)],
                         ids=[*(f"{family}-zero2-cached" for family in FAMILIES), *(f"{family}-zero3" for family in FAMILIES)])
def test_lora_on_two_processes_loads_in_the_family_pipeline(request, family, tiny_assets, tmp_path, stage, extra):
    model = model_of(request, family)
    result = launch(transformer_run_cfg(model, tiny_assets.dataset_dir, tmp_path, *LORA, f"zero_optimization.stage={stage}",
                             "max_train_steps=2", *extra), procs=2)
    assert_ok(result)
    described = "ZeRO-3 (transformer loaded partitioned)" if stage == 3 else f"ZeRO-{stage},"
    assert "LoRA" in result.stdout and described in result.stdout and "2 process(es)" in result.stdout
    if extra == CACHED:
        assert "text encoders freed after the pre-pass" in result.stdout
        assert (tmp_path / "model" / "validation" / "step_000002.png").stat().st_size > 0
    history = losses(tmp_path / "model")
    assert len(history) == 2 and all(math.isfinite(loss) for loss in history)
    weights = load_file(str(tmp_path / "model" / "pytorch_lora_weights.safetensors"))
    assert any(".lora_B." in key and tensor.abs().max() > 0 for key, tensor in weights.items())

    pipe = diffusers_class(family, 1).from_pretrained(model)
    pipe.load_lora_weights(tmp_path / "model")
    assert len(pipe.transformer.peft_config["default_0"].target_modules) == FAMILIES[family][3]
    if stage == 3:
        # Sampling on 2 processes with two LoRA files combined: a grid beside the baseline's images.
        lora_file = tmp_path / "model" / "pytorch_lora_weights.safetensors"
        loras = json.dumps([{"path": str(lora_file), "weight": 0.5}, {"path": str(tmp_path / "model"), "weight": 0.5}])
        samples = tmp_path / "samples"
        run_sample([f"pretrained_model_name_or_path={model}", f"output_dir={tmp_path / 'model'}", "resolution=64",
                    'sample.prompts=["a red circle"]', 'sample.weights=["baseline", "lora"]', f"sample.loras={loras}",
                    "sample.num_inference_steps=2", "sample.num_images_per_prompt=1", f"sample.output_dir={samples}"],
                   procs=2)
        manifest = read_manifest(samples)
        pngs = {image["weight"]: (samples / image["file"]).read_bytes() for image in manifest["images"]}
        assert set(pngs) == {"baseline", "lora"} and pngs["baseline"] != pngs["lora"]
        assert (samples / manifest["grid"]).stat().st_size > 0


# One process: a 16-bit run needs a ZeRO optimizer (engine/stage.py), so bf16 is what runs ZeRO-1 here
# (ZeRO-2 on one process would run as ZeRO-1: nothing to partition). ZeRO-0 in fp32 on one process is
# each family's LoRA resume test (helpers.lora_resumed_from_caches asserts the stage it ran).
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_at_zero1_in_bf16_trains_and_exports(request, family, tiny_assets, tmp_path):
    model = model_of(request, family)
    result = launch(transformer_run_cfg(model, tiny_assets.dataset_dir, tmp_path, *LORA, "zero_optimization.stage=1",
                                        "bf16.enabled=true", "max_train_steps=2"))
    assert_ok(result)
    assert "ZeRO-1, " in result.stdout and "bfloat16, 1 process(es)" in result.stdout
    weights = tensors(tmp_path / "model" / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("transformer.") for key in weights)
    assert any(".lora_B." in key and tensor.abs().max() > 0 for key, tensor in weights.items())
