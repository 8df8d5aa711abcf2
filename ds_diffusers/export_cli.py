"""Offline export of a checkpoint, no process group needed:

    python -m ds_diffusers.export --checkpoint CHECKPOINT_DIR[/step_N] --out DIR [--export-dtype fp32|fp16|bf16]

The fp32 master weights are read from the checkpoint (ZeRO-1/2/3 partitions merged with DeepSpeed's
own consolidation; at stage 0 the fp16/bf16 optimizer's fp32 copies) and cast to `export_dtype`
(the run's setting unless --export-dtype is given): the same bytes as the end-of-training export,
in the same layout (`unet/`, `unet_ema/` with EMA, or `pytorch_lora_weights.safetensors` for LoRA).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ds_diffusers.checkpoint import LATEST, read_meta
from ds_diffusers.config import validate_dict
from ds_diffusers.config.deepspeed import engine_zero_stage
from ds_diffusers.errors import ConfigError
from ds_diffusers.export import EXPORT_DTYPES, cast_for_export, copy_frozen_components, write_lora, write_unet
from ds_diffusers.models import build_unet, param_groups


def _step_dir(path: Path) -> Path:
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    return path


def _fp32_state(step_dir: Path, stage: int, trainable_only: bool, cfg, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    if stage == 0:
        # No ZeRO partitions: the module state dict is stored whole, in the compute dtype.
        states = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = {name: tensor.float() for name, tensor in states["module"].items()}
        optimizer_state = states.get("optimizer") or {}
        if "fp32_groups" in optimizer_state or "fp32_groups_flat" in optimizer_state:
            groups = param_groups(unet, cfg)
            name_of = {id(p): name for name, p in unet.named_parameters()}
            names = [name_of[id(p)] for group in groups for p in group["params"]]
            if "fp32_groups_flat" in optimizer_state:
                shapes = [p.numel() for group in groups for p in group["params"]]
                flat = torch.cat([f.view(-1) for f in optimizer_state["fp32_groups_flat"]])
                masters = list(flat.split(shapes))
            else:
                masters = [m for group in optimizer_state["fp32_groups"] for m in group]
            state.update({name: master.view(state[name].shape) for name, master in zip(names, masters)})
        return state
    if list(step_dir.glob("bf16_zero_pp_rank_*_optim_states.pt")):
        return _bf16_optimizer_masters(step_dir, unet)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name,
                                                    exclude_frozen_parameters=trainable_only)


def _bf16_optimizer_masters(step_dir: Path, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """DeepSpeed's BF16_Optimizer (bf16 with fp32 gradient accumulation at stage 1), whose checkpoints
    zero_to_fp32 does not read: each rank saves its flat fp32 partition and where each parameter's
    fragment lies in it; a parameter is its fragments in rank order."""
    files = sorted(step_dir.glob("bf16_zero_pp_rank_*_optim_states.pt"), key=lambda f: int(f.name.split("_")[4]))
    pieces: dict[str, list[torch.Tensor]] = {}
    for file in files:
        state = torch.load(file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for flat, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
            for name, address in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, address.start, address.numel))
    params = dict(unet.named_parameters())
    return {name: torch.cat(parts).view(params[name].shape).clone() for name, parts in pieces.items()}


def _ema_state(step_dir: Path, unet: torch.nn.Module, world_size: int, stage: int) -> dict[str, torch.Tensor]:
    """Reassemble the EMA slices the ranks saved: each covers [start, start + len) of the flattened
    parameter (all of it at ZeRO-0, a fragment at ZeRO-1/2, a padded partition at ZeRO-3)."""
    ranks = [torch.load(step_dir / f"rank_{r}.pt", map_location="cpu", weights_only=False)["ema"] for r in range(world_size)]
    params = dict(unet.named_parameters())
    state = {}
    for index, name in enumerate(ranks[0]["names"]):
        numel = params[name].numel()
        if "starts" not in ranks[0]:  # saved before slices carried their offsets: ZeRO-3 partitions or full
            slices = [(rank["shadow"][index].view(-1), r * ranks[0]["shadow"][index].numel() if stage == 3 else 0)
                      for r, rank in enumerate(ranks)]
        else:
            slices = [(rank["shadow"][index].view(-1), rank["starts"][index]) for rank in ranks]
        full = torch.zeros(numel, dtype=torch.float32)
        for shadow, start in slices:
            length = max(0, min(shadow.numel(), numel - start))
            full[start:start + length] = shadow[:length]
        state[name] = full.view(params[name].shape)
    return state


def export_checkpoint(checkpoint: str, out: str, export_dtype: str | None = None) -> Path:
    step_dir = _step_dir(Path(checkpoint))
    meta = read_meta(step_dir)
    train_cfg = meta["training_config"]
    cfg = validate_dict({**train_cfg, "pretrained_model_name_or_path": meta["pretrained_model_name_or_path"], "dataset_dir": "."})
    base_dir = Path(cfg.pretrained_model_name_or_path)
    if not (base_dir / "unet").is_dir():
        raise ConfigError("--checkpoint", str(step_dir), f"its base model {base_dir} is gone; the export needs its frozen "
                          "components and UNet config")
    is_lora = cfg.use_lora.action
    export_dtype = export_dtype or cfg.export_dtype
    unet = build_unet(cfg)
    # The stage the engine ran, which decides the checkpoint's layout (one process runs ZeRO-1/2 as 0).
    stage = engine_zero_stage(cfg, meta["world_size"])
    state = _fp32_state(step_dir, stage, trainable_only=is_lora, cfg=cfg, unet=unet)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_lora:
        trainable = {name for name, param in unet.named_parameters() if param.requires_grad}
        adapters = {name: tensor for name, tensor in state.items() if name in trainable}
        return write_lora(unet, cast_for_export(adapters, export_dtype), out_dir)
    full = {**unet.state_dict(), **state}
    path = write_unet(unet.to_json_string(), cast_for_export(full, export_dtype), out_dir)
    if cfg.use_ema:
        ema = _ema_state(step_dir, unet, meta["world_size"], stage)
        write_unet(unet.to_json_string(), cast_for_export({**full, **ema}, export_dtype), out_dir, subfolder="unet_ema")
    copy_frozen_components(base_dir, out_dir, Path(cfg.vae_path) if cfg.vae_path else None, cfg.variant)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_diffusers.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint_dir (uses its latest) or one step_<N> folder")
    parser.add_argument("--out", required=True, help="folder to write the diffusers export into")
    parser.add_argument("--export-dtype", choices=sorted(EXPORT_DTYPES), default=None,
                        help="dtype of the written weights (default: the run's export_dtype, fp32 unless set)")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.out, args.export_dtype)
    except ConfigError as err:
        print(f"ds-diffusers: export error: {err}", file=sys.stderr)
        return 2
    print(f"exported {path}")
    return 0
