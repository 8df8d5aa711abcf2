"""The ZeRO stage policy: which stage the engine really runs for a config, and what a run of that
stage may switch off. `config.deepspeed` applies the policy when it writes the DeepSpeed dict; the
offline export applies it to know the layout of a checkpoint's files.
"""

from __future__ import annotations

from typing import Any

from ds_diffusers.config.checks import resolve_offload_device
from ds_diffusers.config.schema import Config


def accumulates_in_fp32(cfg: Config) -> bool:
    """16-bit weights summed over several micro-batches: the sum is kept in fp32, or the small
    gradients of late micro-batches are rounded away (bf16 keeps 8 bits of mantissa)."""
    return cfg.weight_dtype_name != "float32" and cfg.gradient_accumulation_steps > 1


def engine_zero_stage(cfg: Config, world_size: int) -> int:
    """The stage the engine runs. ZeRO-1/2 partition optimizer state and gradients over the data-
    parallel ranks; with one rank they partition nothing and only add per-parameter gradient hooks
    and buffer copies (a quarter of a step for the embedded model on a CPU), so a single process
    runs them as stage 0, which makes the same update. Optimizer offload needs stage >= 1 and
    ZeRO-3 partitions differently, so both keep their stage.

    DeepSpeed 0.19.8 accumulates 16-bit gradients in fp32 only at stage >= 1 (stage 0 raises
    "unsupported mix of model_dtype and grad_accum_dtype"; stage 1 with bf16 runs its BF16_Optimizer),
    so such runs never take the stage-0 shortcut, and a configured stage 0 runs as stage 1, which
    makes the same update."""
    zero = cfg.zero_optimization
    offloads = resolve_offload_device(zero.offload_optimizer.device) != "none"
    shortcut = world_size == 1 and zero.stage in (1, 2) and not offloads
    if accumulates_in_fp32(cfg):
        return 1 if shortcut or zero.stage == 0 else zero.stage
    return 0 if shortcut else zero.stage


def skip_single_rank_allreduce(engine: Any, world_size: int, engine_stage: int) -> None:
    """Averaging gradients over one rank changes nothing, but the stage-0 engine would still
    flatten, all-reduce and copy back every gradient each step. (ZeRO-1..3 finalise their gradient
    buffers in that call, so they keep it.)"""
    if world_size == 1 and engine_stage == 0:
        engine.enable_backward_allreduce = False
