"""Offline export of a checkpoint, no process group needed:

    python -m ds_diffusers.export --checkpoint CHECKPOINT_DIR[/step_N] --out DIR

ZeRO-1/2/3 partitions are merged into fp32 tensors with DeepSpeed's own consolidation; the result is
the same diffusers layout as the end-of-training export (`unet/`, `unet_ema/` with EMA, or
`pytorch_lora_weights.safetensors` for LoRA runs).
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
from ds_diffusers.export import copy_frozen_components, write_lora, write_unet
from ds_diffusers.models import build_unet


def _step_dir(path: Path) -> Path:
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    return path


def _fp32_state(step_dir: Path, stage: int, trainable_only: bool) -> dict[str, torch.Tensor]:
    if stage == 0:
        # No ZeRO partitions: the module state dict is stored whole.
        states = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {name: tensor.float() for name, tensor in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name,
                                                    exclude_frozen_parameters=trainable_only)


def _ema_state(step_dir: Path, unet: torch.nn.Module, world_size: int, stage: int) -> dict[str, torch.Tensor]:
    """Reassemble the EMA shards the ranks saved (partitions of the flattened parameter under ZeRO-3)."""
    ranks = [torch.load(step_dir / f"rank_{r}.pt", map_location="cpu", weights_only=False)["ema"] for r in range(world_size)]
    params = dict(unet.named_parameters())
    state = {}
    for index, name in enumerate(ranks[0]["names"]):
        if stage == 3:
            flat = torch.cat([rank["shadow"][index] for rank in ranks])
            state[name] = flat[: params[name].numel()].view(params[name].shape).clone()
        else:
            state[name] = ranks[0]["shadow"][index]
    return state


def export_checkpoint(checkpoint: str, out: str) -> Path:
    step_dir = _step_dir(Path(checkpoint))
    meta = read_meta(step_dir)
    train_cfg = meta["training_config"]
    cfg = validate_dict({**train_cfg, "pretrained_model_name_or_path": meta["pretrained_model_name_or_path"], "dataset_dir": "."})
    base_dir = Path(cfg.pretrained_model_name_or_path)
    if not (base_dir / "unet").is_dir():
        raise ConfigError("--checkpoint", str(step_dir), f"its base model {base_dir} is gone; the export needs its frozen "
                          "components and UNet config")
    is_lora = cfg.use_lora.action
    unet = build_unet(cfg)
    # The stage the engine ran, which decides the checkpoint's layout (one process runs ZeRO-1/2 as 0).
    stage = engine_zero_stage(cfg, meta["world_size"])
    state = _fp32_state(step_dir, stage, trainable_only=is_lora)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_lora:
        trainable = {name for name, param in unet.named_parameters() if param.requires_grad}
        return write_lora(unet, {name: tensor for name, tensor in state.items() if name in trainable}, out_dir)
    full = {**unet.state_dict(), **state}
    path = write_unet(unet.to_json_string(), full, out_dir)
    if cfg.use_ema:
        ema = _ema_state(step_dir, unet, meta["world_size"], stage)
        write_unet(unet.to_json_string(), {**full, **ema}, out_dir, subfolder="unet_ema")
    copy_frozen_components(base_dir, out_dir)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_diffusers.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint_dir (uses its latest) or one step_<N> folder")
    parser.add_argument("--out", required=True, help="folder to write the diffusers export into")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.out)
    except ConfigError as err:
        print(f"ds-diffusers: export error: {err}", file=sys.stderr)
        return 2
    print(f"exported {path}")
    return 0
