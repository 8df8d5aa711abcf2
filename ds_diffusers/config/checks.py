"""Checks across keys (`check_consistency`, pure) and against the machine (`check_environment`:
paths, accelerator features, optional packages). Both run before any work starts and write nothing.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import shutil
from pathlib import Path
from typing import Any

from ds_diffusers.config.schema import Config
from ds_diffusers.devices import check_accelerator_expected
from ds_diffusers.errors import ConfigError


def resolve_offload_device(device: str) -> str:
    """The seed's `"auto"` means no offload: offload is never switched on behind the user's back."""
    return "none" if device == "auto" else device


def check_consistency(cfg: Config) -> None:
    if cfg.resolution % 8 != 0:
        lower, upper = cfg.resolution // 8 * 8, cfg.resolution // 8 * 8 + 8
        raise ConfigError("resolution", cfg.resolution, f"must be a multiple of 8 (the VAE downsamples by 8); use {lower or 8} or {upper}")
    if cfg.use_fp16.enabled and cfg.bf16.enabled:
        raise ConfigError("bf16.enabled", True, "use_fp16.enabled and bf16.enabled are both true; turn one of them off")
    zero = cfg.zero_optimization
    param_device = resolve_offload_device(zero.offload_param.device)
    if param_device != "none" and zero.stage != 3:
        raise ConfigError("zero_optimization.offload_param.device", zero.offload_param.device,
                          f"parameter offload needs ZeRO stage 3 (stage is {zero.stage}); set stage to 3 or device to none")
    optimizer_device = resolve_offload_device(zero.offload_optimizer.device)
    if optimizer_device != "none" and zero.stage == 0:
        raise ConfigError("zero_optimization.offload_optimizer.device", zero.offload_optimizer.device,
                          "optimizer offload needs ZeRO stage 1, 2 or 3; raise zero_optimization.stage or set device to none")
    for name, block in (("offload_param", zero.offload_param), ("offload_optimizer", zero.offload_optimizer)):
        if block.device == "nvme" and not block.nvme_path:
            raise ConfigError(f"zero_optimization.{name}.nvme_path", None, "device is nvme; set nvme_path to a folder on a fast local disk")
    if cfg.cache_latents and not cfg.center_crop:
        raise ConfigError("cache_latents", True, "a random crop (center_crop: false) picks a new window every epoch, which "
                          "one cached encoding per image cannot hold; set center_crop: true or cache_latents: false")
    if cfg.use_ema and cfg.use_lora.action:
        raise ConfigError("use_ema", True, "EMA of LoRA adapters is not supported; set use_ema false or use_lora.action false")
    if cfg.validation_use_ema and not cfg.use_ema:
        raise ConfigError("validation_use_ema", True, "there are no EMA weights to validate with; set use_ema true or validation_use_ema false")
    _check_ema_offload(cfg)
    _check_optimizer(cfg)
    _check_scheduler(cfg)
    if (cfg.validation_steps or cfg.validation_epochs) and not cfg.validation_prompts:
        raise ConfigError("validation_prompts", [], "validation is on (validation_steps/validation_epochs > 0) but no prompts are given; "
                          "add prompts or set both to 0")


def _check_ema_offload(cfg: Config) -> None:
    """The EMA reads every fp32 master after every step and swaps its weights into the ZeRO-3 partitions
    for validation. CPU offload keeps both in memory; NVMe offload keeps them on disk (streamed in per
    sub-group), so that pair is refused."""
    if not cfg.use_ema:
        return
    for name in ("offload_optimizer", "offload_param"):
        device = getattr(cfg.zero_optimization, name).device
        if device == "nvme":
            raise ConfigError(f"zero_optimization.{name}.device", device, "use_ema reads the fp32 masters every step and "
                              "swaps weights in for validation, which NVMe offload keeps on disk; offload to cpu, or set use_ema false")


def _check_optimizer(cfg: Config) -> None:
    params = cfg.optimizer.params
    lr = params.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise ConfigError("optimizer.params.lr", lr, "set a positive learning rate, e.g. 1e-4")
    betas = params.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ConfigError("optimizer.params.betas", betas, "give two numbers in [0, 1), e.g. [0.9, 0.999]")
    for index, group in enumerate(cfg.optimizer.param_groups):
        try:
            re.compile(group.match)
        except re.error as err:
            raise ConfigError(f"optimizer.param_groups[{index}].match", group.match, f"not a valid regular expression ({err})")


_SCHEDULER_PARAMS = {
    "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"},
    "WarmupDecayLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "total_num_steps"},
    "WarmupCosineLR": {"warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type", "total_num_steps"},
    "none": set(),
}


def _check_scheduler(cfg: Config) -> None:
    valid = _SCHEDULER_PARAMS[cfg.scheduler.type]
    for key in cfg.scheduler.params:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"{cfg.scheduler.type} takes: {', '.join(sorted(valid)) or 'no params'}"
            raise ConfigError(f"scheduler.params.{key}", cfg.scheduler.params[key], f"not a parameter of {cfg.scheduler.type}; {hint}")
    for key, value in cfg.scheduler.params.items():
        if key.endswith(("_steps", "_lr", "_ratio")) and key != "warmup_type":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"scheduler.params.{key}", value, "must be a non-negative number")
    warmup_type = cfg.scheduler.params.get("warmup_type", "log")
    if warmup_type not in ("log", "linear"):
        raise ConfigError("scheduler.params.warmup_type", warmup_type, "use 'log' or 'linear'")


def check_model_dir(value: str) -> None:
    path = Path(value)
    if not path.is_dir():
        raise ConfigError("pretrained_model_name_or_path", value,
                          "no such folder; point it at a local diffusers model folder (with model_index.json), "
                          "e.g. a downloaded stable-diffusion-v1-5, or run `python -m ds_diffusers.embedded` for the tiny default")
    missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / sub).is_dir()]
    if missing:
        raise ConfigError("pretrained_model_name_or_path", value,
                          f"not a diffusers model folder (no {', '.join(missing)} subfolder); use the folder that holds model_index.json")


def _check_output_paths(cfg: Config) -> None:
    for field in ("output_dir", "checkpoint_dir"):
        value = getattr(cfg, field)
        path = Path(value)
        if path.exists() and not path.is_dir():
            raise ConfigError(field, value, "exists and is a file; choose a folder path (the file is left untouched)")
        existing_parent = next((p for p in [path, *path.parents] if p.exists()), None)
        if existing_parent is not None and not existing_parent.is_dir():
            raise ConfigError(field, value, f"{existing_parent} is a file, so this folder cannot be created; choose another path")


def check_environment(cfg: Config) -> None:
    """Disk, accelerator and package checks; must be called on every rank before models are loaded."""
    check_model_dir(cfg.pretrained_model_name_or_path)
    if not Path(cfg.dataset_dir).exists():
        raise ConfigError("dataset_dir", cfg.dataset_dir, "no such folder; point it at a local dataset folder "
                          "(save_to_disk, hub-layout parquet/arrow, or an imagefolder with imagefolder: true)")
    _check_output_paths(cfg)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    check_accelerator_expected(accelerator.device_name())
    if cfg.use_fp16.enabled and not accelerator.is_fp16_supported():
        hint = "set use_fp16.enabled false and bf16.enabled true" if accelerator.is_bf16_supported() else "set use_fp16.enabled false"
        raise ConfigError("use_fp16.enabled", True, f"the {accelerator.device_name()} accelerator has no fp16 training; {hint}")
    if cfg.bf16.enabled and not accelerator.is_bf16_supported():
        raise ConfigError("bf16.enabled", True, f"the {accelerator.device_name()} accelerator has no bf16; set bf16.enabled false")
    for field, package in (("wandb.enabled", "wandb"), ("tensorboard.enabled", "tensorboard")):
        block = getattr(cfg, field.split(".")[0])
        if block.enabled and importlib.util.find_spec(package) is None:
            raise ConfigError(field, True, f"the {package} package is not installed; `pip install {package}` or set {field} false")
    for name in ("offload_param", "offload_optimizer"):
        block = getattr(cfg.zero_optimization, name)
        if block.device == "nvme" and block.nvme_path and not Path(block.nvme_path).is_dir():
            raise ConfigError(f"zero_optimization.{name}.nvme_path", block.nvme_path, "no such folder; create it on a local NVMe disk")


def fused_adam_unavailable(accelerator: Any) -> str | None:
    """Why DeepSpeed's fused Adam cannot run here, or None when it is prebuilt (`DS_BUILD_FUSED_ADAM=1
    pip install deepspeed`) or can be JIT-built on first use (which needs ninja and the CUDA compiler
    on every node)."""
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("fused_adam"):
        return None
    builder = accelerator.create_op_builder("FusedAdamBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        return f"DeepSpeed has no fused Adam for the {accelerator.device_name()} accelerator here"
    if shutil.which("ninja") is None:
        return "it is not prebuilt and ninja is not installed to build it"
    if accelerator.device_name() == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
            return "it is not prebuilt and nvcc (the CUDA toolkit) is not found to build it"
    return None
