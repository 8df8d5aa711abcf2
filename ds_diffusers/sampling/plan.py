"""The effective sampling settings: the `sample` block with its nulls filled from the training keys,
checked across fields, plus which prompts each rank draws and where each image goes."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ds_diffusers.config.schema import Config
from ds_diffusers.errors import ConfigError


@dataclass(frozen=True)
class LoraFile:
    path: str
    weight: float


@dataclass(frozen=True)
class SamplePlan:
    prompts: tuple[str, ...]
    negative_prompt: str
    num_images_per_prompt: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    clip_skip: int | None
    seed: int
    resolution: int
    weights: tuple[str, ...]
    lora_scale: float
    loras: tuple[LoraFile, ...]
    output_dir: str

    @classmethod
    def from_config(cls, cfg: Config) -> "SamplePlan":
        """Raises ConfigError("sample.<field>", ...) for settings that cannot work together."""
        block = cfg.sample
        prompts = block.prompts if block.prompts is not None else cfg.validation_prompts
        if not prompts:
            raise ConfigError("sample.prompts", block.prompts, "no prompts to sample: set sample.prompts "
                              "(e.g. [\"a red circle\"]) or validation_prompts")
        resolution = block.resolution if block.resolution is not None else cfg.resolution
        if resolution % 8 != 0:
            lower = max(8, resolution // 8 * 8)
            raise ConfigError("sample.resolution", resolution, f"must be a multiple of 8 (the VAE downsamples by 8); "
                              f"use {lower} or {resolution // 8 * 8 + 8}")
        if not block.weights:
            raise ConfigError("sample.weights", [], "name at least one of baseline, tuned, ema, lora")
        repeated = sorted({name for name in block.weights if block.weights.count(name) > 1})
        if repeated:
            raise ConfigError("sample.weights", block.weights, f"{', '.join(repeated)} listed twice; name each weight once")
        if "lora" not in block.weights:
            if block.loras:
                raise ConfigError("sample.loras", [entry.model_dump() for entry in block.loras],
                                  "LoRA files are only used by the lora weight; add \"lora\" to sample.weights")
            if block.lora_scale != 1.0:
                raise ConfigError("sample.lora_scale", block.lora_scale,
                                  "only the lora weight is scaled; add \"lora\" to sample.weights or leave lora_scale at 1.0")
        return cls(
            prompts=tuple(prompts),
            negative_prompt=block.negative_prompt,
            num_images_per_prompt=block.num_images_per_prompt or cfg.num_validation_images,
            num_inference_steps=block.num_inference_steps or cfg.validation_inference_steps,
            guidance_scale=block.guidance_scale if block.guidance_scale is not None else cfg.validation_guidance_scale,
            scheduler=block.scheduler,
            clip_skip=block.clip_skip,
            seed=block.seed if block.seed is not None else cfg.seed,
            resolution=resolution,
            weights=tuple(block.weights),
            lora_scale=block.lora_scale,
            loras=tuple(LoraFile(entry.path, entry.weight) for entry in block.loras),
            output_dir=block.output_dir or str(Path(cfg.output_dir) / "samples"),
        )

    def prompt_indices(self, rank: int, world_size: int) -> list[int]:
        """This rank's prompts, round robin; every prompt goes to exactly one rank."""
        return list(range(rank, len(self.prompts), world_size))

    def image_path(self, weight: str, prompt_index: int, image_index: int) -> Path:
        return Path(self.output_dir) / weight / f"p{prompt_index:03d}_{_slug(self.prompts[prompt_index])}_i{image_index:02d}.png"

    @property
    def grid_path(self) -> Path:
        return Path(self.output_dir) / "grid.png"

    @property
    def manifest_path(self) -> Path:
        return Path(self.output_dir) / "manifest.json"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _slug(prompt: str, max_length: int = 40) -> str:
    """A file-name-safe prefix of the prompt (the index in front keeps names unique)."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_length].rstrip("-") or "empty"


def check_against_model(plan: SamplePlan, model_dir: str) -> None:
    """Settings that depend on the base model, read from its config files (nothing is loaded)."""
    if plan.clip_skip is None:
        return
    config_file = Path(model_dir) / "text_encoder" / "config.json"
    num_layers = int(json.loads(config_file.read_text())["num_hidden_layers"])
    if plan.clip_skip >= num_layers:
        raise ConfigError("sample.clip_skip", plan.clip_skip, f"the text encoder has {num_layers} layers; skip at most "
                          f"{num_layers - 1} (1 = the penultimate layer, as for SD 1.x anime-style checkpoints), or null")
