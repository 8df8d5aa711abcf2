"""The fp32 master weights out of the files `engine.save_checkpoint` wrote, without an engine.

A resume reads these files through `engine.load_checkpoint`; the offline export has no engine, so
this module knows DeepSpeed 0.19.8's layout of a step folder, which depends on the stage it ran:
- stage 0: `mp_rank_00_model_states.pt` holds the module state dict (in the compute dtype) and the
  optimizer state; under fp16/bf16 the FP16 optimizer wrappers keep their fp32 copies there, per
  parameter (`fp32_groups`) or as one flat buffer per group (`fp32_groups_flat`);
- ZeRO-1/2 under bf16 (BF16_Optimizer with fp32 gradient accumulation at stage 1, the ZeRO
  optimizer otherwise): `bf16_zero_pp_rank_<R>_*` files, each rank's flat fp32 partition and where
  each parameter's fragment lies in it;
- ZeRO-1/2 in fp32 and ZeRO-3: DeepSpeed's own consolidation, `zero_to_fp32`.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import torch

MODEL_STATES = "mp_rank_00_model_states.pt"
BF16_OPTIMIZER_STATES = "bf16_zero_pp_rank_*_optim_states.pt"
# A file one data-parallel rank writes alone carries its rank (`_get_zero_ckpt_prefix` for the optimizer
# states, `_get_ckpt_name` for ZeRO-3's model states); the rest (MODEL_STATES below ZeRO-3) are rank 0's.
_RANK_IN_NAME = re.compile(r"(?:^|_)pp_rank_(\d+)_")


def deepspeed_writer_rank(name: str) -> int:
    """The rank that wrote the DeepSpeed file `name` of a step folder (no model or pipeline parallelism:
    the data-parallel rank is the global rank)."""
    match = _RANK_IN_NAME.search(name)
    return int(match.group(1)) if match else 0


def written_at_stage_0(step_dir: Path) -> bool:
    """Whether a ZeRO-0 engine wrote this step folder: it writes no `*optim_states.pt` files (its
    optimizer state is inside the model-states file). Read from the files, not from today's stage
    policy: 16-bit runs with one process wrote stage-0 checkpoints before they were moved to ZeRO-1."""
    return not any(step_dir.glob("*optim_states.pt"))


def checkpoint_engine_stage(step_dir: Path, configured_stage: int) -> int:
    """The stage whose layout the folder has, as the readers here need it: 0, 3 (never changed by the
    stage policy) or 1 (for 1 or 2, whose layouts they read alike)."""
    if written_at_stage_0(step_dir):
        return 0
    return 3 if configured_stage == 3 else 1


def _load(path: Path) -> Any:
    # DeepSpeed pickles its own classes (the fragment addresses) next to the tensors. Memory-mapped
    # (zip files): only the fp32 masters are read, not the Adam moments beside them.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(path))


def _stage0_state(step_dir: Path, optimizer_order: list[str]) -> dict[str, torch.Tensor]:
    """`optimizer_order`: the trainable parameters' names in the order of the optimizer's groups."""
    states = _load(step_dir / MODEL_STATES)
    state = {name: tensor.float() for name, tensor in states["module"].items()}
    optimizer_state = states.get("optimizer") or {}
    if "fp32_groups_flat" in optimizer_state:
        # The flat buffer is the plain concatenation of the group's parameters.
        flat = torch.cat([f.view(-1) for f in optimizer_state["fp32_groups_flat"]])
        masters = list(flat.split([state[name].numel() for name in optimizer_order]))
    elif "fp32_groups" in optimizer_state:
        masters = [m for group in optimizer_state["fp32_groups"] for m in group]
    else:  # fp32 at stage 0: the module's own weights are the masters
        return state
    state.update({name: master.view(state[name].shape) for name, master in zip(optimizer_order, masters)})
    return state


def _bf16_optimizer_state(step_dir: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """zero_to_fp32 does not read BF16_Optimizer checkpoints; a parameter is its fragments in rank order."""
    files = sorted(step_dir.glob(BF16_OPTIMIZER_STATES), key=lambda f: int(f.name.split("_")[4]))
    pieces: dict[str, list[torch.Tensor]] = {}
    for file in files:
        state = _load(file)["optimizer_state_dict"]
        for flat, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
            for name, address in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, address.start, address.numel))
    return {name: torch.cat(parts).view(shapes[name]).clone() for name, parts in pieces.items()}


def read_fp32_state(step_dir: Path, engine_stage: int, *, trainable_only: bool, optimizer_order: list[str],
                    shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """fp32 tensors by parameter name from one step folder. `engine_stage` is the stage the engine
    ran (`engine_zero_stage`), `optimizer_order` the trainable parameters' names in the optimizer's
    group order, `shapes` every parameter's shape. At stage 0 the frozen parameters DeepSpeed kept
    come back too (widened from the compute dtype); with `trainable_only` the ZeRO reader skips them."""
    if engine_stage == 0:
        return _stage0_state(step_dir, optimizer_order)
    # ZeRO-3 under bf16 names its files the same way, but they hold flat partitions zero_to_fp32 reads.
    if engine_stage < 3 and list(step_dir.glob(BF16_OPTIMIZER_STATES)):
        return _bf16_optimizer_state(step_dir, shapes)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name,
                                                    exclude_frozen_parameters=trainable_only)
