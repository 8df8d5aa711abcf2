"""Translate a validated `Config` into the dict handed to `deepspeed.initialize`.

Pure: the caller supplies the world size, the run length and the accelerator name, so every stage
and precision can be unit-tested without processes.
"""

from __future__ import annotations

from typing import Any

from ds_diffusers.config.checks import resolve_offload_device
from ds_diffusers.config.schema import Config, MonitorCfg

def _offload_block(block: Any) -> dict[str, Any] | None:
    device = resolve_offload_device(block.device)
    if device == "none":
        return None
    out: dict[str, Any] = {"device": device, "pin_memory": block.pin_memory}
    if device == "nvme":
        out["nvme_path"] = block.nvme_path
    return out


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


def zero_block(cfg: Config, world_size: int) -> dict[str, Any]:
    zero = cfg.zero_optimization
    out: dict[str, Any] = {"stage": engine_zero_stage(cfg, world_size)}
    for name in ("offload_param", "offload_optimizer"):
        block = _offload_block(getattr(zero, name))
        if block is not None:
            out[name] = block
    knobs = zero.model_dump(exclude={"stage", "offload_param", "offload_optimizer"}, exclude_none=True)
    out.update(knobs)
    return out


def optimizer_block(cfg: Config, accelerator_name: str, fused_adam_ok: bool = True) -> dict[str, Any]:
    """`fused_adam_ok`: DeepSpeed's fused Adam kernel is prebuilt or can be built here (see
    `checks.fused_adam_unavailable`); when not, torch's fused AdamW makes the same update."""
    params = dict(cfg.optimizer.params)
    offloads_optimizer = resolve_offload_device(cfg.zero_optimization.offload_optimizer.device) != "none"
    if cfg.optimizer.type.lower() in ("adam", "adamw") and not offloads_optimizer:
        if accelerator_name == "cpu":
            # On the CPU accelerator DeepSpeed would JIT-compile its fused Adam kernel (a minute per
            # fresh machine); torch's AdamW computes the same update.
            params.setdefault("torch_adam", True)
        elif not fused_adam_ok:
            params.setdefault("torch_adam", True)
            params.setdefault("fused", True)  # DeepSpeed passes it through to torch.optim.AdamW
    return {"type": cfg.optimizer.type, "params": params}


def _monitor_block(block: MonitorCfg, default_path: str) -> dict[str, Any]:
    return {"enabled": True, "output_path": block.output_path or default_path, "job_name": block.job_name}


def to_deepspeed_config(
    cfg: Config,
    *,
    world_size: int,
    accelerator_name: str = "cpu",
    fused_adam_ok: bool = True,
) -> dict[str, Any]:
    """No "scheduler" block: the lr schedule is a LambdaLR handed to deepspeed.initialize
    (`config.schedules.lr_scheduler_factory`)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.train_micro_batch_size_per_gpu * cfg.gradient_accumulation_steps * world_size,
        "steps_per_print": 10**9,  # progress is reported by our own loop, not DeepSpeed's log lines
        "wall_clock_breakdown": cfg.wall_clock_breakdown,
        "zero_optimization": zero_block(cfg, world_size),
        "optimizer": optimizer_block(cfg, accelerator_name, fused_adam_ok),
        "gradient_clipping": cfg.gradient_clipping,
        "zero_allow_untested_optimizer": True,
    }
    if cfg.use_fp16.enabled:
        ds["fp16"] = {"enabled": True, **cfg.use_fp16.model_dump(exclude={"enabled"})}
    elif cfg.bf16.enabled:
        ds["bf16"] = {"enabled": True}
    if accumulates_in_fp32(cfg):
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if cfg.flops_profiler.enabled:
        ds["flops_profiler"] = cfg.flops_profiler.model_dump()
    if cfg.tensorboard.enabled:
        ds["tensorboard"] = _monitor_block(cfg.tensorboard, f"{cfg.output_dir}/logs/tensorboard")
    if cfg.csv_monitor.enabled:
        ds["csv_monitor"] = _monitor_block(cfg.csv_monitor, f"{cfg.output_dir}/logs/csv")
    return ds
