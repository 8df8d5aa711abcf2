"""The `sample` block of the cfg file: settings of `python -m ds_diffusers.sample` (baseline vs tuned
images from the same file that trained the model). A null value means "as the training run's
validation grid": prompts, images per prompt, steps, guidance, seed and resolution all default to
the training keys, so the default cfg samples what it validated.

Cross-field checks (prompts present, resolution a multiple of 8, LoRA keys only with a `lora`
weight) are in `ds_diffusers.sampling.plan`; the weight files are looked up in
`ds_diffusers.sampling.weights`.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ds_diffusers.config.blocks import Block

# Names of the samplers; `ds_diffusers.sampling.schedulers` maps each to a diffusers scheduler.
SchedulerName = Literal["dpmsolver++", "euler", "euler_ancestral", "ddim", "pndm", "unipc"]
WeightName = Literal["baseline", "tuned", "ema", "lora"]


class LoraFileCfg(Block):
    path: str = Field(min_length=1, description="A .safetensors file, or a folder holding "
                      "`pytorch_lora_weights.safetensors`.")
    weight: float = Field(1.0, description="This adapter's weight in the combination.")


class SampleCfg(Block):
    prompts: Optional[list[str]] = Field(None, description="Prompts to draw; null = `validation_prompts`.")
    negative_prompt: str = Field("", description="Negative prompt for every image; \"\" = none (unconditional).")
    num_images_per_prompt: Optional[int] = Field(None, ge=1, description="Images per prompt and weight; null = "
                                                 "`num_validation_images`.")
    num_inference_steps: Optional[int] = Field(None, ge=1, description="Sampler steps; null = `validation_inference_steps`.")
    guidance_scale: Optional[float] = Field(None, ge=0.0, description="Classifier-free guidance "
                                            "scale; null = `validation_guidance_scale`.")
    scheduler: SchedulerName = Field("dpmsolver++", description="`dpmsolver++` (DPM-Solver++ multistep), `euler`, "
                                     "`euler_ancestral`, `ddim`, `pndm` or `unipc`, built from the model's scheduler config "
                                     "(betas, prediction type).")
    clip_skip: Optional[int] = Field(None, ge=1, description="Text-encoder layers skipped from the end (1 = the "
                                     "penultimate layer); null = none.")
    seed: Optional[int] = Field(None, ge=0, description="Seed of the per-image generators; null = `seed`.")
    resolution: Optional[int] = Field(None, ge=8, description="Image size in pixels (a multiple of 8); null = `resolution`.")
    weights: list[WeightName] = Field(["baseline", "tuned"], description="Columns of the comparison, any of `baseline`, "
                                      "`tuned`, `ema`, `lora`, each once.")
    lora_scale: float = Field(1.0, description="Multiplies every adapter weight of the `lora` column "
                              "(0 = the baseline).")
    loras: list[LoraFileCfg] = Field([], description="LoRA files of the `lora` column, combined as peft adapters, e.g. "
                                     "`[{\"path\": \"a.safetensors\", \"weight\": 0.7}, {\"path\": \"outputs/other/model\", "
                                     "\"weight\": 0.3}]`; [] = the training run's `output_dir/pytorch_lora_weights.safetensors`.")
    output_dir: Optional[str] = Field(None, description="Where images, grid and manifest go; null = `<output_dir>/samples`.")
