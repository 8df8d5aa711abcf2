"""Offline export of a checkpoint in one process, no process group needed (the CLI is `__main__`).

The fp32 master weights are read from the checkpoint (ZeRO-1/2/3 partitions merged with DeepSpeed's
own consolidation; at stage 0 the fp16/bf16 optimizer's fp32 copies) and cast to `export_dtype`
(the run's setting unless --export-dtype is given): the same bytes as the end-of-training export,
in the same layout (`unet/`, `unet_ema/` with EMA, or `pytorch_lora_weights.safetensors` for LoRA).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ds_diffusers.checkpoint import damaged_file, intact_before
from ds_diffusers.checkpoint_digests import unrecorded_note
from ds_diffusers.checkpoint_reader import read_ema, read_meta, resolve_step_dir
from ds_diffusers.config import validate_dict
from ds_diffusers.engine.checkpoint_files import checkpoint_engine_stage, read_fp32_state
from ds_diffusers.errors import ConfigError
from ds_diffusers.export.write import cast_for_export, copy_frozen_components, ema_folder, write_lora, write_unet
from ds_diffusers.families import detect_family
from ds_diffusers.models import build_unet, param_groups


def check_intact(step_dir: Path, meta: dict) -> None:
    """Refuse a step whose files are truncated or changed since the save, before any is read."""
    damaged = damaged_file(step_dir)
    if damaged is not None:
        previous = intact_before(str(step_dir.parent), int(meta.get("global_step", 0)))
        fix = f"export the previous intact step with --checkpoint {previous}" if previous else "no earlier intact step is left"
        raise ConfigError("--checkpoint", str(step_dir), f"{damaged} is damaged (truncated, unreadable or changed since "
                          f"it was saved); {fix}")
    note = unrecorded_note(step_dir, meta)
    if note is not None:
        print(note, file=sys.stderr, flush=True)


def export_checkpoint(checkpoint: str, out: str, export_dtype: str | None = None) -> Path:
    step_dir = resolve_step_dir(Path(checkpoint))
    meta = read_meta(step_dir)
    check_intact(step_dir, meta)
    train_cfg = meta["training_config"]
    cfg = validate_dict({**train_cfg, "pretrained_model_name_or_path": meta["pretrained_model_name_or_path"], "dataset_dir": "."})
    base_dir = Path(cfg.pretrained_model_name_or_path)
    family = detect_family(base_dir)
    if not (base_dir / family.denoiser_folder).is_dir():
        raise ConfigError("--checkpoint", str(step_dir), f"its base model {base_dir} is gone; the export needs its frozen "
                          "components and UNet config")
    is_lora = cfg.use_lora.action
    export_dtype = export_dtype or cfg.export_dtype
    unet = build_unet(cfg)
    stage = checkpoint_engine_stage(step_dir, cfg.zero_optimization.stage)
    shapes = {name: param.shape for name, param in unet.named_parameters()}
    name_of = {id(param): name for name, param in unet.named_parameters()}
    optimizer_order = [name_of[id(param)] for group in param_groups(unet, cfg) for param in group["params"]]
    state = read_fp32_state(step_dir, stage, trainable_only=is_lora, optimizer_order=optimizer_order, shapes=shapes)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_lora:
        trainable = {name for name, param in unet.named_parameters() if param.requires_grad}
        adapters = {name: tensor for name, tensor in state.items() if name in trainable}
        return write_lora(unet, cast_for_export(adapters, export_dtype), out_dir, family)
    full = {**unet.state_dict(), **state}
    path = write_unet(unet.to_json_string(), cast_for_export(full, export_dtype), out_dir, subfolder=family.denoiser_folder)
    if cfg.use_ema:
        ema = read_ema(step_dir, meta["world_size"], stage, shapes)
        write_unet(unet.to_json_string(), cast_for_export({**full, **ema}, export_dtype), out_dir,
                   subfolder=ema_folder(family.denoiser_folder))
    copy_frozen_components(base_dir, out_dir, Path(cfg.vae_path) if cfg.vae_path else None, cfg.variant)
    return path

