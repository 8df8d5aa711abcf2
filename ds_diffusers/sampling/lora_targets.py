"""Check that every UNet tensor of a LoRA file lands on a module of the base UNet, with its shape.

diffusers drops LoRA keys that name no module with a warning and applies the rest, so an SD 1.5 LoRA
on SDXL samples (and exits 0) whenever the text widths happen to agree. Here the file's header (no
tensor is read) is compared with the base UNet's modules, built from its config.json on the meta
device (no weight is read either).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from ds_diffusers.errors import ConfigError

# unet.<module>.<lora_A|lora_B|lora.down|lora.up>[.<adapter>].<weight|bias>: peft and diffusers' formats
# (`transformer.` for a transformer denoiser, FLUX.1's).
_DIFFUSERS_KEY = re.compile(r"^(unet|transformer)\.(?P<module>.+?)\.(?P<role>lora_A|lora_B|lora\.down|lora\.up)(\.[^.]+)?\.(weight|bias)$")
# lora_unet_<module with _ for .>.<lora_down|lora_up>.weight: kohya's format with diffusers' module names.
_KOHYA_KEY = re.compile(r"^lora_unet_(?P<module>[^.]+)\.(?P<role>lora_down|lora_up)\.weight$")
# kohya keys named after the original (SGM) blocks: diffusers renames those itself, so no module map fits.
_SGM_BLOCKS = ("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks")
_DOWN_ROLES = ("lora_A", "lora.down", "lora_down")
# Not the UNet's: the text encoders' adapters, per-module scalars, DoRA magnitudes.
_OTHER_PREFIXES = ("text_encoder", "lora_te")
_OTHER_SUFFIXES = (".alpha", "dora_scale", "lora_magnitude_vector")


@lru_cache(maxsize=4)
def unet_module_shapes(unet_dir: str) -> dict[str, tuple[int, int]]:
    """(out features, in features) of every Linear and Conv2d of the UNet in `unet_dir`, by module name."""
    import diffusers
    import torch

    config = json.loads((Path(unet_dir) / "config.json").read_text())
    model_class = getattr(diffusers, config.get("_class_name", "UNet2DConditionModel"))
    with torch.device("meta"):
        unet = model_class.from_config(config)
    return {name: (module.weight.shape[0], module.weight.shape[1]) for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


def _header_shapes(lora_file: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as handle:
        return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}


def _target(key: str, kohya_names: dict[str, str]) -> tuple[str, str] | None:
    """(module name, role) a UNet LoRA key adapts; None for keys that adapt no UNet module."""
    if key.startswith(_OTHER_PREFIXES) or key.endswith(_OTHER_SUFFIXES):
        return None
    match = _DIFFUSERS_KEY.match(key)
    if match:
        # diffusers' oldest format: attention processors' to_q_lora ... to_out_lora.
        module = re.sub(r"\.processor\.to_(q|k|v)_lora$", r".to_\1", match["module"])
        return re.sub(r"\.processor\.to_out_lora$", ".to_out.0", module), match["role"]
    match = _KOHYA_KEY.match(key)
    if match:
        return kohya_names.get(match["module"], match["module"]), match["role"]
    return key, "unknown"


def check_lora_targets(field: str, lora_file: Path, unet_dir: str) -> None:
    """ConfigError naming the first UNet key of `lora_file` that adapts no module of the UNet in
    `unet_dir`, or one whose shape does not fit that module, and what the module expects."""
    shapes = _header_shapes(lora_file)
    if any(key.startswith(_SGM_BLOCKS) for key in shapes):
        return  # diffusers converts these names while loading; there is nothing to match them against here
    modules = unet_module_shapes(unet_dir)
    kohya_names = {name.replace(".", "_"): name for name in modules}
    fix = "use a LoRA trained on this base model, or set pretrained_model_name_or_path to the model it was trained on"
    for key in sorted(shapes):
        target = _target(key, kohya_names)
        if target is None:
            continue
        module, role = target
        if role == "unknown":
            raise ConfigError(field, str(lora_file), f"key '{key}' is in no LoRA format diffusers applies to a UNet "
                              f"(expected unet.<module>.lora_A/lora_B.weight); {fix}")
        if module not in modules:
            raise ConfigError(field, str(lora_file), f"key '{key}' adapts '{module}', but the base UNet {unet_dir} "
                              f"{_missing_part(module, modules)}: the LoRA was made for another model; {fix}")
        out_features, in_features = modules[module]
        # lora_A/down takes the module's input (dim 1), lora_B/up gives its output (dim 0; a bias has only that).
        down = role in _DOWN_ROLES and len(shapes[key]) > 1
        got, expected = (shapes[key][1], in_features) if down else (shapes[key][0], out_features)
        if got != expected:
            side = "input" if down else "output"
            raise ConfigError(field, str(lora_file), f"key '{key}' has shape {shapes[key]}, but '{module}' of the base "
                              f"UNet {unet_dir} has {side} width {expected}: the LoRA was made for another model; {fix}")


def _missing_part(module: str, modules: dict[str, tuple[int, int]]) -> str:
    """Where the module path leaves the UNet: "has 'down_blocks.0' but no 'down_blocks.0.attentions'"."""
    parts = module.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:depth])
        if any(name.startswith(parent + ".") for name in modules):
            return f"has '{parent}' but no '{parent}.{parts[depth]}'"
    return f"has no '{parts[0]}'"
