"""Model families (SD 1.x/2.x, SDXL, FLUX.1, SD 3.5, Qwen-Image): each one file describing how its folder is recognised, loaded,
conditioned, trained and sampled (`base.ModelFamily`). Adding a family is adding a file here and
listing it in FAMILIES (see docs/development.md, "Adding a model family")."""

from __future__ import annotations

from pathlib import Path

from ds_diffusers.families.base import ModelFamily, model_index, vae_downsampling
from ds_diffusers.families.flux import FLUX
from ds_diffusers.families.qwen_image import QWEN_IMAGE
from ds_diffusers.families.sd import SD
from ds_diffusers.families.sd3 import SD3
from ds_diffusers.families.sdxl import SDXL, SDXL_PARTS

# Detection order: the first family whose pipeline class model_index.json names; SD is the fallback.
FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SDXL, FLUX, SD3, QWEN_IMAGE, SD)}
FALLBACK = SD
FAMILY_NAMES = {name: family.title for name, family in FAMILIES.items()}

__all__ = ["FAMILIES", "FAMILY_NAMES", "ModelFamily", "SDXL_PARTS", "detect_family", "family_named", "family_of_pipeline", "model_family",
           "model_index", "vae_downsampling"]


def detect_family(model_dir: str | Path) -> ModelFamily:
    """The family of a diffusers folder, read from its `model_index.json` (nothing is loaded)."""
    index = model_index(model_dir)
    return next((family for family in FAMILIES.values() if family.detects(index)), FALLBACK)


def model_family(model_dir: str | Path) -> str:
    """The name of `detect_family(model_dir)` ("sd", "sdxl", "flux", "sd3"), as checkpoints record it."""
    return detect_family(model_dir).name


def family_named(name: str) -> ModelFamily:
    return FAMILIES[name]


def family_of_pipeline(pipe: object) -> ModelFamily:
    """The family whose pipeline class `pipe` is (SD for any other)."""
    return next((family for family in FAMILIES.values() if type(pipe).__name__ in family.pipeline_classes), FALLBACK)
