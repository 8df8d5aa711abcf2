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
    """The stage the engine runs.

    fp32: ZeRO-1/2 partition optimizer state and gradients over the data-parallel ranks; with one
    rank they partition nothing and only add per-parameter gradient hooks and buffer copies (a
    quarter of a step for the embedded model on a CPU), so a single process runs them as stage 0,
    which makes the same update. Optimizer offload needs stage >= 1 and ZeRO-3 partitions
    differently, so both keep their stage.

    fp16/bf16 never run stage 0. DeepSpeed 0.19.8's stage-0 wrappers (FP16_Optimizer with its fused
    Adam, FP16_UnfusedOptimizer otherwise) are not `ZeROOptimizer`s, so `engine.backward` never
    multiplies the loss by the loss scale, yet their `step()` divides the gradients by it: every
    update is 2**16 times too small and the scaler never sees an overflow. bf16 at stage 0 runs the
    same FP16_Optimizer (fp32 gradient copies per parameter), and 16-bit gradients are accumulated
    in fp32 only at stage >= 1. So a 16-bit run takes ZeRO-1 where stage 0 was configured or one
    process makes ZeRO-1/2 equivalent; the update is the same, and the ZeRO optimizers scale the
    loss and keep fp32 masters."""
    zero = cfg.zero_optimization
    offloads = resolve_offload_device(zero.offload_optimizer.device) != "none"
    nothing_to_partition = world_size == 1 and zero.stage in (1, 2) and not offloads
    if cfg.weight_dtype_name == "float32":
        return 0 if nothing_to_partition else zero.stage
    return 1 if nothing_to_partition or zero.stage == 0 else zero.stage


def skip_single_rank_allreduce(engine: Any, world_size: int, engine_stage: int) -> None:
    """Averaging gradients over one rank changes nothing, but the stage-0 engine would still
    flatten, all-reduce and copy back every gradient each step. (ZeRO-1..3 finalise their gradient
    buffers in that call, so they keep it.)"""
    if world_size == 1 and engine_stage == 0:
        engine.enable_backward_allreduce = False
