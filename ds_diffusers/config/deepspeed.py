"""Translate a validated `Config` into the dict handed to `deepspeed.initialize`.

Pure: the caller supplies the world size, the run length and the accelerator name, so every stage
and precision can be unit-tested without processes.
"""

from __future__ import annotations

from typing import Any

from ds_diffusers.config.checks import resolve_offload_device
from ds_diffusers.config.schema import Config, MonitorCfg
# The stage policy lives with the other DeepSpeed knowledge; the translation below applies it.
from ds_diffusers.engine.stage import accumulates_in_fp32, engine_zero_stage

def _offload_block(block: Any) -> dict[str, Any] | None:
    device = resolve_offload_device(block.device)
    if device == "none":
        return None
    out: dict[str, Any] = {"device": device, "pin_memory": block.pin_memory}
    if device == "nvme":
        out["nvme_path"] = block.nvme_path
    return out


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
