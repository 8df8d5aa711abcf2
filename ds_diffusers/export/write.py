"""Gathered weights -> a diffusers folder that the standard loaders read.

Full fine-tune: `output_dir/unet/` (the family's denoiser folder: FLUX.1's `transformer/`) plus the
frozen components copied byte-for-byte from the base model, so the family's pipeline
(`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `FluxPipeline`,
`StableDiffusion3Pipeline`) `from_pretrained(output_dir)` loads it.
LoRA: `output_dir/pytorch_lora_weights.safetensors` in the family's key names (`ModelFamily.save_lora_weights`),
read by `pipe.load_lora_weights(output_dir)`.

Trained weights come from the fp32 masters (`engine.MasterWeights`), not the 16-bit compute copy,
then are cast to `export_dtype` (fp32 by default), so the end-of-run export and the offline export of
the last checkpoint (`export.offline`) write the same bytes. Under ZeRO-3 a parameter on one rank is an
empty placeholder, so weights are gathered one tensor at a time on all ranks and only rank 0 writes
(a plain `save_pretrained` would write empty tensors).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ds_diffusers.engine import MasterWeights, gathered, is_zero3_param
from ds_diffusers.families import ModelFamily, detect_family
from ds_diffusers.families.sd import SD

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
UNET_DIR = "unet"
EMA_DIR = "unet_ema"  # the EMA weights of a use_ema run, beside UNET_DIR
# What an export writes into output_dir besides the frozen components.
EXPORT_RESULTS = (UNET_DIR, EMA_DIR, LORA_WEIGHTS)
FROZEN_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler", "feature_extractor", "safety_checker",
                "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3", "image_encoder")
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cast_for_export(state: dict[str, torch.Tensor], export_dtype: str) -> dict[str, torch.Tensor]:
    """One cast for both exports, so they agree byte for byte."""
    dtype = EXPORT_DTYPES[export_dtype]
    return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in state.items()}


def gathered_state_dict(module: torch.nn.Module, *, rank: int, trainable_only: bool = False,
                        exclude: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """All ranks must call this. Returns full CPU tensors on rank 0 and an empty dict elsewhere."""
    trainable = {name for name, param in module.named_parameters() if param.requires_grad}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if (trainable_only and name not in trainable) or name in exclude:
            continue
        if is_zero3_param(tensor):
            with gathered([tensor]):
                if rank == 0:
                    state[name] = tensor.detach().cpu().clone()
        elif rank == 0:
            state[name] = tensor.detach().cpu().clone()
    return state


def _replace_dir(staging: Path, final: Path) -> None:
    """Swap a fully written folder into place; the old one is removed only after the new one exists."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)


def write_unet(config_json: str, state: dict[str, torch.Tensor], out_dir: Path, subfolder: str = UNET_DIR) -> Path:
    """Rank 0 only. Writes `out_dir/<subfolder>/` in the diffusers layout."""
    final = out_dir / subfolder
    staging = out_dir / f".{subfolder}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    contiguous = {name: state[name].contiguous() for name in sorted(state)}  # one order, the same bytes
    save_file(contiguous, str(staging / UNET_WEIGHTS), metadata={"format": "pt"})
    (staging / "config.json").write_text(config_json)
    _replace_dir(staging, final)
    return final


def _drop_variant(folder: Path, variant: str) -> None:
    """Plain weight names (`model.fp16.safetensors` -> `model.safetensors`, shard indexes rewritten),
    so the export loads without a variant, as its `unet/` does. `folder` holds copies, never the cache's files."""
    for path in list(folder.iterdir()):
        plain = path.name.replace(f".{variant}.", ".").replace(f".{variant}-", "-")
        if plain == path.name:
            continue
        if path.suffix == ".json":  # a shard index names the shard files
            path.write_text(path.read_text().replace(f".{variant}-", "-"))
        os.replace(path, path.with_name(plain))


def copy_frozen_components(base_dir: Path, out_dir: Path, vae_dir: Path | None = None, variant: str | None = None) -> None:
    """Rank 0 only. The frozen parts are copied from the base model, not re-saved from memory,
    so they keep their original dtype and files. SDXL's second encoder and tokenizer are among them,
    and `vae_dir` (the `vae_path` a run trained with) replaces the base model's `vae/`. A `variant`
    run's weight files are copied under their plain names."""
    if base_dir.resolve() == out_dir.resolve():
        return
    for part in FROZEN_PARTS:
        source = vae_dir if part == "vae" and vae_dir is not None else base_dir / part
        if source.is_dir():
            staging = out_dir / f".{part}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging)
            if variant is not None:
                _drop_variant(staging, variant)
            _replace_dir(staging, out_dir / part)
    shutil.copy2(base_dir / "model_index.json", out_dir / "model_index.json")


def ema_folder(denoiser_folder: str) -> str:
    """Where the EMA weights go beside the denoiser's folder (`unet_ema/`, `transformer_ema/`)."""
    return EMA_DIR if denoiser_folder == UNET_DIR else f"{denoiser_folder}_ema"


def write_lora(unet: torch.nn.Module, trainable_state: dict[str, torch.Tensor], out_dir: Path,
               family: ModelFamily | None = None) -> Path:
    """Rank 0 only. `trainable_state` holds the gathered adapter tensors under peft's names; `family`
    (SD's by default) names them as its pipeline's `load_lora_weights` reads them."""
    from peft.utils import get_peft_model_state_dict

    lora_state = get_peft_model_state_dict(unet, state_dict=trainable_state)
    lora_state = {name: tensor.contiguous() for name, tensor in lora_state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / ".lora.partial"
    shutil.rmtree(partial, ignore_errors=True)
    # The adapter config travels as metadata so the loader uses our alpha, not alpha = rank.
    metadata = unet.peft_config["default"].to_dict()
    (family or SD).save_lora_weights(partial, lora_state, metadata)
    final = out_dir / LORA_WEIGHTS
    os.replace(partial / LORA_WEIGHTS, final)
    shutil.rmtree(partial)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(final, 0o666 & ~umask)  # the writer creates it private; an export is meant to be shared
    return final


def export_model(engine: Any, *, is_lora: bool, base_dir: str, out_dir: str, rank: int, export_dtype: str = "fp32",
                 ema_weights: dict[str, torch.Tensor] | None = None, vae_dir: str | None = None,
                 variant: str | None = None) -> Path | None:
    """All ranks must call this (gathers masters and ZeRO-3 partitions, once); rank 0 writes. Returns the
    written path on rank 0.

    `ema_weights` (what `ShardedEMA.gathered` returns: full fp32 tensors on rank 0, an empty dict on
    the others, never None on one rank only) also writes `unet_ema/`: the same state with the EMA in
    place of the trained weights, as the offline export writes it."""
    unet = engine.module
    masters = MasterWeights(engine)
    state = gathered_state_dict(unet, rank=rank, trainable_only=is_lora, exclude=frozenset(masters.names))
    state.update(masters.gather_full(masters.local()))
    if rank != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = detect_family(base_dir)
    if is_lora:
        return write_lora(unet, cast_for_export(state, export_dtype), out, family)
    folder = family.denoiser_folder
    path = write_unet(unet.to_json_string(), cast_for_export(state, export_dtype), out, subfolder=folder)
    if ema_weights is not None:
        write_unet(unet.to_json_string(), cast_for_export({**state, **ema_weights}, export_dtype), out,
                   subfolder=ema_folder(folder))
    copy_frozen_components(Path(base_dir), out, Path(vae_dir) if vae_dir else None, variant)
    return path
