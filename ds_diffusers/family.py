"""Superseded by the `ds_diffusers.families` package; these names stay importable for code written
against this module (other branches) and can go once nothing imports them."""

from __future__ import annotations

from typing import Literal

from ds_diffusers.families import FAMILY_NAMES, SDXL_PARTS, model_family, model_index
from ds_diffusers.families.sdxl import StableDiffusionXL

Family = Literal["sd", "sdxl"]
SDXL_PIPELINES = StableDiffusionXL.pipeline_classes

__all__ = ["FAMILY_NAMES", "Family", "SDXL_PARTS", "SDXL_PIPELINES", "model_family", "model_index"]
