"""Which model family a diffusers folder holds, read from its files (nothing is loaded).

"sdxl": `model_index.json` names `StableDiffusionXLPipeline` (two text encoders, `text_time`
micro-conditioning); "sd": everything else this project trains (SD 1.x / 2.x layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

Family = Literal["sd", "sdxl"]
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")


def model_index(model_dir: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(model_dir) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}


def model_family(model_dir: str | Path) -> Family:
    return "sdxl" if model_index(model_dir).get("_class_name") in SDXL_PIPELINES else "sd"


FAMILY_NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL"}
