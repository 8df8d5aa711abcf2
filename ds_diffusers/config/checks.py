"""Checks across keys (`check_consistency`, pure) and against the machine (`check_environment`:
paths, accelerator features, optional packages). Both run before any work starts and write nothing.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ds_diffusers.config.blocks import unquoted
from ds_diffusers.config.hub import weight_variants
from ds_diffusers.config.optimizers import check_optimizer_backend, check_optimizer_block
from ds_diffusers.config.schedules import check_scheduler
from ds_diffusers.config.schema import Config
from ds_diffusers.devices import check_accelerator_expected
from ds_diffusers.errors import ConfigError
from ds_diffusers.families import detect_family, vae_downsampling


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
    if cfg.aspect_ratio_buckets:
        _check_buckets(cfg)
    elif cfg.bucket_resolutions:
        raise ConfigError("bucket_resolutions", cfg.bucket_resolutions, "is only used with aspect-ratio buckets; set "
                          "aspect_ratio_buckets: true or remove bucket_resolutions")
    if cfg.seed > 2**63 - 1:
        raise ConfigError("seed", cfg.seed, "torch seeds are 64-bit; use a seed below 2**63")
    if cfg.use_lora.action and cfg.use_lora.init == "loftq":
        raise ConfigError("use_lora.init", "loftq", "LoftQ needs a quantized base and a loftq_config, which ds-diffusers does not "
                          "set up; use true, false, \"gaussian\", \"pissa\" or \"olora\"")
    if cfg.skip_bad_images and cfg.cache_latents:
        raise ConfigError("skip_bad_images", True, "cannot be combined with cache_latents (a cached row has no image to "
                          "replace); fix or remove the unreadable images, or set cache_latents: false")
    if cfg.dataset_format == "webdataset":
        _check_webdataset(cfg)
    if cfg.use_ema and cfg.use_lora.action:
        raise ConfigError("use_ema", True, "EMA of LoRA adapters is not supported; set use_ema false or use_lora.action false")
    if cfg.validation_use_ema and not cfg.use_ema:
        raise ConfigError("validation_use_ema", True, "there are no EMA weights to validate with; set use_ema true or validation_use_ema false")
    _check_ema_offload(cfg)
    _check_optimizer(cfg)
    check_scheduler(cfg)
    _check_validation(cfg)


def _check_validation(cfg: Config) -> None:
    validating = cfg.validation_steps or cfg.validation_epochs
    if validating and not cfg.validation_prompts and not cfg.validation_split and not cfg.validation_dataset_dir:
        raise ConfigError("validation_prompts", [], "validation is on (validation_steps/validation_epochs > 0) but there is "
                          "nothing to validate: add prompts, hold out rows with validation_split (or validation_dataset_dir), "
                          "or set both to 0")
    if cfg.validation_split and cfg.validation_dataset_dir:
        raise ConfigError("validation_dataset_dir", cfg.validation_dataset_dir, "gives the held-out rows, and so does "
                          f"validation_split={cfg.validation_split:g}; set one of them")
    if cfg.validation_dataset_dir and not validating:
        raise ConfigError("validation_dataset_dir", cfg.validation_dataset_dir, "would never be validated on; set "
                          "validation_steps or validation_epochs, or remove it")
    if cfg.validation_split >= 1 and cfg.validation_split != int(cfg.validation_split):
        raise ConfigError("validation_split", cfg.validation_split, "a value of 1 or more is a number of rows and must be whole; "
                          "use a fraction below 1 or a whole number")
    if cfg.validation_split and not validating:
        raise ConfigError("validation_split", cfg.validation_split, "rows would be held out of training but never validated on; "
                          "set validation_steps or validation_epochs, or validation_split: 0")


def _check_buckets(cfg: Config) -> None:
    if cfg.bucket_step % 8:
        raise ConfigError("bucket_step", cfg.bucket_step, "must be a multiple of 8 (the VAE downsamples by 8); use "
                          f"{max(8, cfg.bucket_step // 8 * 8)} or {cfg.bucket_step // 8 * 8 + 8}")
    for side in cfg.bucket_resolutions or [cfg.resolution]:
        if side < 2 * cfg.bucket_step:
            raise ConfigError("bucket_resolutions", cfg.bucket_resolutions or cfg.resolution, f"side {side} is below 2 × "
                              f"bucket_step ({cfg.bucket_step}), which leaves no aspect ratios; raise it or lower bucket_step")


def check_bucket_step(cfg: Config) -> None:
    """`bucket_step` against the model: a multiple of the VAE's factor × the denoiser's downsampling
    (the family says what that is: a UNet's blocks, a transformer's patches)."""
    if not cfg.aspect_ratio_buckets:
        return
    model_dir = Path(cfg.pretrained_model_name_or_path)
    vae_dir = Path(cfg.vae_path) if cfg.vae_path else model_dir / "vae"
    family = detect_family(model_dir)
    try:
        vae_factor = vae_downsampling(json.loads((vae_dir / "config.json").read_text()))
        denoiser_config = json.loads((model_dir / family.denoiser_folder / "config.json").read_text())
        denoiser_factor = family.denoiser_downsampling(denoiser_config)
    except (OSError, ValueError, KeyError, TypeError):
        return  # check_model_dir names an unreadable config
    multiple = vae_factor * denoiser_factor
    if cfg.bucket_step % multiple:
        raise ConfigError("bucket_step", cfg.bucket_step, f"this model's latents must divide by its {family.denoiser_folder}'s "
                          f"downsampling: use a multiple of {multiple} (VAE factor {vae_factor} × {family.denoiser_folder} "
                          f"{denoiser_factor})")


def _check_webdataset(cfg: Config) -> None:
    """Options of the `datasets` path that shards do not take."""
    fixes = {"cache_latents": "write pre-encoded shards instead (python -m ds_diffusers.data.write_shards --encode)",
             "cache_text_embeddings": "write pre-encoded shards instead (python -m ds_diffusers.data.write_shards --encode)",
             "skip_bad_images": "remove the unreadable images from the shards", "imagefolder": "set imagefolder: false",
             "max_train_samples": "write the subset into its own shards",
             "validation_split": "hold validation rows out of the shards and check with validation_prompts, "
                                 "or train from the datasets folder (dataset_format: datasets)",
             "validation_dataset_dir": "validate with validation_prompts, or train from the datasets folder "
                                       "(dataset_format: datasets)",
             "aspect_ratio_buckets": "write the shards at one resolution, or train from the datasets folder "
                                     "(dataset_format: datasets)"}
    for field, fix in fixes.items():
        if getattr(cfg, field) not in (False, None):
            raise ConfigError(field, getattr(cfg, field), f"not with dataset_format: webdataset; {fix}")


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
    check_optimizer_block(cfg.optimizer.type, params)
    lr = params.get("lr")
    if isinstance(lr, str):
        raise ConfigError("optimizer.params.lr", lr, unquoted("lr", lr))
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


# What `from_pretrained` reads from each part of a diffusers model folder: a config, and weights
# (single-file, sharded with an index, or a precision variant).
_MODEL_PARTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "scheduler": "scheduler_config.json", "tokenizer": None}
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.index.json")


def _check_weights(folder: Path, variant: str | None, field: str = "pretrained_model_name_or_path",
                   value: str | None = None) -> None:
    """Weights that `from_pretrained(folder, variant=variant)` finds: with a variant, files named
    `*.<variant>.safetensors` (or .bin); without one, plain ones, not only another variant's."""
    value = value if value is not None else str(folder.parent)
    names = [child.name for child in folder.iterdir()]
    variants = weight_variants(names)
    if variant is not None and variant not in variants:
        raise ConfigError("variant", variant, f"{folder} holds no {variant} weights (*.{variant}.safetensors); set variant "
                          f"to null or to one the folder has ({', '.join(sorted(v or 'null' for v in variants)) or 'none'})")
    if variant is None and not any(next(folder.glob(pattern), None) for pattern in _WEIGHT_PATTERNS):
        raise ConfigError(field, value, f"{folder} holds no weights (*.safetensors or *.bin); download or copy the model again")
    if variant is None and variants and None not in variants:
        raise ConfigError("variant", None, f"{folder} holds only variant weights ({', '.join(sorted(variants))}); set "
                          f"variant to {sorted(variants)[0]}")


def check_vae_dir(value: str, field: str = "vae_path") -> None:
    if not (Path(value) / "config.json").is_file():
        raise ConfigError(field, value, "no config.json there; point it at a diffusers VAE folder "
                          "(e.g. madebyollin/sdxl-vae-fp16-fix) or set it to null")
    _check_weights(Path(value), None, field, value)


def check_model_dir(value: str, variant: str | None = None) -> None:
    path = Path(value)
    if not path.is_dir():
        raise ConfigError("pretrained_model_name_or_path", value,
                          "no such folder; point it at a local diffusers model folder (with model_index.json), "
                          "e.g. a downloaded stable-diffusion-v1-5, or run `python -m ds_diffusers.embedded` for the tiny default")
    # The denoiser's folder is the family's (`unet/`, FLUX.1's `transformer/`).
    denoiser_folder = detect_family(path).denoiser_folder
    parts = {(denoiser_folder if sub == "unet" else sub): config_name for sub, config_name in _MODEL_PARTS.items()}
    missing = [sub for sub in parts if not (path / sub).is_dir()]
    if missing:
        raise ConfigError("pretrained_model_name_or_path", value,
                          f"not a diffusers model folder (no {', '.join(missing)} subfolder); use the folder that holds model_index.json")
    for sub, config_name in parts.items():
        if config_name is not None:
            config_file = path / sub / config_name
            try:
                json.loads(config_file.read_text())
            except (OSError, ValueError) as err:
                reason = "missing" if isinstance(err, FileNotFoundError) else f"unreadable ({err})"
                raise ConfigError("pretrained_model_name_or_path", value, f"{config_file} is {reason}; download or copy the model again")
        if sub in (denoiser_folder, "vae", "text_encoder"):
            _check_weights(path / sub, variant)
    if not any((path / "tokenizer" / name).is_file() for name in ("vocab.json", "tokenizer.json")):
        raise ConfigError("pretrained_model_name_or_path", value, f"{path / 'tokenizer'} holds no vocab.json or tokenizer.json; "
                          "download or copy the model again")
    family = detect_family(path)
    missing = [sub for sub in family.extra_parts if not (path / sub).is_dir()]
    if missing:
        raise ConfigError("pretrained_model_name_or_path", value, f"model_index.json names a {family.title} pipeline but "
                          f"there is no {', '.join(missing)} subfolder; download the complete {family.title} folder")


def check_writable_folder(value: str, field: str) -> None:
    """The folder exists and takes a file, or can be created; creates nothing (a rejected run leaves
    the disk as it was; the run itself makes its folders once every check has passed)."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ConfigError(field, value, "exists and is a file; choose a folder path (the file is left untouched)")
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(field, value, f"{existing} is a file, so this folder cannot be created; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(field, value, f"cannot write in {existing} (permission denied); choose a writable folder")
    if shutil.disk_usage(existing).free < 2**20:
        raise ConfigError(field, value, f"no space left on {existing}; free space or choose another disk")


def _check_file_target(value: str, field: str) -> None:
    """A file DeepSpeed opens for writing without creating its folder (the flops profiler's)."""
    path = Path(value)
    if path.is_dir():
        raise ConfigError(field, value, "is a folder; give a file path, e.g. outputs/flops.txt")
    if not path.absolute().parent.is_dir():
        raise ConfigError(field, value, f"its folder {path.absolute().parent} does not exist; create it or use null (print to the log)")
    check_writable_folder(str(path.absolute().parent), field)


def check_lora_targets(cfg: Config) -> None:
    """Every `use_lora.target_modules` entry (null: the family's default) names a module of this
    denoiser, matched as peft matches a name (the whole name or its dotted suffix); the denoiser is
    built from its config on the meta device (no weights read). peft itself only fails when nothing
    at all matches."""
    import diffusers
    import torch

    family = detect_family(cfg.pretrained_model_name_or_path)
    model_class = getattr(diffusers, family.denoiser_class)
    denoiser_config = model_class.load_config(cfg.pretrained_model_name_or_path, subfolder=family.denoiser_folder)
    with torch.device("meta"):
        unet = model_class.from_config(denoiser_config)
    names = [name for name, _ in unet.named_modules() if name]
    if cfg.use_lora.target_modules is not None and not cfg.use_lora.target_modules:
        raise ConfigError("use_lora.target_modules", [], "name at least one module of the denoiser, e.g. [\"to_q\", \"to_k\", \"to_v\", \"to_out.0\"]")
    for target in family.lora_target_modules(cfg.use_lora.target_modules):
        if not any(name == target or name.endswith(f".{target}") for name in names):
            leaves = sorted({name.rsplit(".", 1)[-1] for name in names if "attn" in name} | {"to_out.0"})
            close = difflib.get_close_matches(target, leaves, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else "use e.g. [\"to_q\", \"to_k\", \"to_v\", \"to_out.0\"]"
            raise ConfigError("use_lora.target_modules", target, f"matches no module of the {family.denoiser_folder}; {hint}")


def check_environment(cfg: Config) -> None:
    """Disk, accelerator and package checks; must be called on every rank before models are loaded."""
    check_model_dir(cfg.pretrained_model_name_or_path, cfg.variant)
    detect_family(cfg.pretrained_model_name_or_path).check_config(cfg)
    if cfg.dataset_format == "webdataset" and not Path(cfg.dataset_dir).expanduser().is_dir():
        raise ConfigError("dataset_dir", cfg.dataset_dir, "no such folder; with dataset_format: webdataset point it at a "
                          "folder of WebDataset .tar shards")
    if not Path(cfg.dataset_dir).exists():
        raise ConfigError("dataset_dir", cfg.dataset_dir, "no such folder; point it at a local dataset folder "
                          "(save_to_disk, hub-layout parquet/arrow, or an imagefolder with imagefolder: true)")
    if cfg.validation_dataset_dir is not None and not Path(cfg.validation_dataset_dir).expanduser().is_dir():
        raise ConfigError("validation_dataset_dir", cfg.validation_dataset_dir, "no such folder; point it at a local dataset "
                          "folder in one of dataset_dir's layouts, or hold out rows with validation_split instead")
    if cfg.vae_path is not None:
        check_vae_dir(cfg.vae_path)
    check_bucket_step(cfg)
    for field in ("output_dir", "checkpoint_dir"):
        check_writable_folder(getattr(cfg, field), field)
    if cfg.cache_latents or cfg.cache_text_embeddings:
        check_writable_folder(cfg.cache_dir, "cache_dir")
    for field in ("tensorboard", "csv_monitor"):
        block = getattr(cfg, field)
        if block.enabled and block.output_path:
            check_writable_folder(block.output_path, f"{field}.output_path")
    if cfg.flops_profiler.enabled and cfg.flops_profiler.output_file:
        _check_file_target(cfg.flops_profiler.output_file, "flops_profiler.output_file")
    if cfg.use_lora.action:
        check_lora_targets(cfg)
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
        if block.device == "nvme" and block.nvme_path:
            check_writable_folder(block.nvme_path, f"zero_optimization.{name}.nvme_path")
            aio = accelerator.create_op_builder("AsyncIOBuilder")
            if aio is None or not aio.is_compatible(verbose=False):
                raise ConfigError(f"zero_optimization.{name}.device", "nvme", "DeepSpeed's async_io op cannot be built here "
                                  "(it needs libaio: apt install libaio-dev, then reinstall deepspeed); use cpu offload instead")
    offloads = resolve_offload_device(cfg.zero_optimization.offload_optimizer.device) != "none"
    check_optimizer_backend(cfg.optimizer.type, cfg.optimizer.params, offloads, accelerator.device_name())


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
