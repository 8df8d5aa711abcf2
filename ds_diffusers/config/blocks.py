"""The nested blocks of the config (`use_lora`, `use_fp16`, `zero_optimization`, ...), each key with
its description; `schema.Config` puts them under their seed names. Shapes, types and ranges only, as
in `schema.py`.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

OffloadDevice = Literal["none", "cpu", "nvme", "auto"]

# The fix of a NaN or infinite value, wherever it is.
NOT_FINITE = "not a finite number (NaN and ±Infinity are refused); write a finite number, e.g. the default (docs/config.md)"


def unquoted(key: str, text: str) -> str:
    """The fix of a number or bool written as a JSON string: the same text without its quotes."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        value = None
    if not isinstance(value, (int, float)) or not math.isfinite(value):  # bools are ints
        return "it is a string; write a number or true/false, without quotes"
    return f'it is a string; write it without quotes: "{key}": {text.strip()}'


def _finite(value: Any) -> Any:
    """A free-form value (a number, or a list or dict of them) with no NaN or infinity inside."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(NOT_FINITE)
        if isinstance(item, (list, dict)):
            _finite(item)
    return value


# The free-form `params` dicts: any JSON value, but the numbers finite, as in every typed field.
FreeFormParams = dict[str, Annotated[Any, AfterValidator(_finite)]]


class Block(BaseModel):
    """Strict: a JSON string is never silently read as a number or a bool; no number is NaN or infinite."""

    # Python's json reads NaN, Infinity and -Infinity, in a cfg file and in `--set`; no key means any of
    # them (`lr <= 0` is False for NaN, so range checks alone let NaN through to a traceback after
    # output_dir exists).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class LoraCfg(Block):
    action: bool = Field(False, description="Train peft LoRA adapters instead of the full UNet; the result is exported as "
                         "`pytorch_lora_weights.safetensors` (with its rank and alpha as metadata).")
    rank: int = Field(4, ge=1, description="LoRA rank.")
    alpha: float = Field(4.0, gt=0, description="LoRA alpha; the adapter's scale is alpha / rank.")
    target_modules: Optional[list[str]] = Field(
        None, description="Denoiser modules that get adapters (peft `target_modules`: a module's whole name or its dotted "
        "suffix). null = the model family's: `[\"to_k\", \"to_q\", \"to_v\", \"to_out.0\"]` for SD 1.x/2.x and SDXL, "
        "FLUX.1's and SD 3.5's attention projections (`attn.to_q/k/v`, `attn.to_out.0`, `attn.add_q/k/v_proj`, "
        "`attn.to_add_out`). "
        "Each entry must match a module of this denoiser, checked before any work with the closest name suggested.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    init: Union[bool, Literal["gaussian", "pissa", "olora", "loftq"]] = Field(
        True, description="peft `init_lora_weights`: true (B = 0, so training starts from the base model), false "
        "(random), \"gaussian\", \"pissa\" or \"olora\". \"loftq\" is refused: it needs a quantized base.")


class Fp16Cfg(Block):
    enabled: bool = Field(False, description="fp16 mixed precision with DeepSpeed's loss scaler (GPU only: the CPU has no "
                          "fp16 training); exclusive with `bf16.enabled`.")
    auto_cast: bool = Field(False, description="DeepSpeed fp16 `auto_cast`.")
    loss_scale: float = Field(0.0, ge=0.0, description="0 = dynamic loss scaling, else this static scale.")
    initial_scale_power: int = Field(16, ge=0, le=64, description="Initial dynamic scale 2^N (it scales the gradients "
                                     "only, never the forward loss).")
    loss_scale_window: int = Field(1000, ge=1, description="Steps without overflow before the dynamic scale grows.")
    hysteresis: int = Field(2, ge=1, description="Overflows tolerated before the dynamic scale shrinks.")
    consecutive_hysteresis: bool = Field(False, description="Refill the hysteresis only after consecutive good steps.")
    min_loss_scale: float = Field(1.0, gt=0.0, description="Lowest dynamic scale.")


class Bf16Cfg(Block):
    enabled: bool = Field(False, description="bf16 mixed precision with fp32 master weights; exclusive with "
                          "`use_fp16.enabled`.")


class ParamGroupCfg(Block):
    match: str = Field(min_length=1, description="Regular expression searched in the parameter name. A parameter takes "
                       "the first rule that matches; every rule must match some trainable parameter.")
    lr_scale: float = Field(1.0, gt=0.0, description="The group's lr is `optimizer.params.lr` × lr_scale (the schedule "
                            "multiplies every group's lr alike).")
    weight_decay: Optional[float] = Field(None, ge=0.0, description="The group's weight decay; null = "
                                          "`optimizer.params.weight_decay`.")


class OptimizerCfg(Block):
    type: str = Field("AdamW", description="An optimizer the installed DeepSpeed builds: its own `Adam`, `AdamW`, "
                      "`Adagrad`, `Lamb`, `Lion`, `MuAdam`, `MuAdamW`, `MuSGD`, `Muon` (any case, as DeepSpeed) or a "
                      "`torch.optim` class by its exact name (`SGD`, `RMSprop`, ...; not `LBFGS`/`SparseAdam`); checked "
                      "before any work, with the closest name suggested.")
    params: FreeFormParams = Field(
        {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
        description="Passed to the optimizer; every name must be a parameter of the class this run builds (torch's, "
        "DeepSpeed's CPU kernel with optimizer offload, or DeepSpeed's fused kernel), checked up front with the closest "
        "name suggested. `lr` must be positive, `betas` two numbers in [0, 1). `max_grad_norm` is refused (use "
        "`gradient_clipping`). On the CPU without offload `torch_adam: true` is added (torch's AdamW instead of compiling "
        "DeepSpeed's kernel); on a GPU where DeepSpeed's fused Adam is neither prebuilt nor buildable, `torch_adam: true, "
        "fused: true`.")
    param_groups: list[ParamGroupCfg] = Field([], description="Per-module learning rates, e.g. `[{\"match\": \"attn\", "
                                              "\"lr_scale\": 2.0}]`; parameters no rule matches keep the base lr and weight decay.")


class SchedulerCfg(Block):
    # DeepSpeed's names (the seed's) and diffusers' get_scheduler names; see config/schedules.py.
    type: Literal["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "constant", "constant_with_warmup", "linear", "cosine",
                  "cosine_with_restarts", "polynomial", "none"] = Field(
        "WarmupLR", description="DeepSpeed's names: `WarmupLR` (warm up, then constant), `WarmupDecayLR` (linear decay to "
        "0), `WarmupCosineLR` (cosine); diffusers' `--lr_scheduler` names: `constant`, `constant_with_warmup`, `linear`, "
        "`cosine`, `cosine_with_restarts`, `polynomial`; or `none` (the optimizer's lr throughout).")
    params: FreeFormParams = Field(
        {}, description="Per type: `warmup_num_steps` (all but `constant`/`none`; default `lr_warmup_steps`), "
        "`total_num_steps` (decaying types; default the run length); WarmupLR/WarmupDecayLR `warmup_min_lr` (0), "
        "`warmup_max_lr` (`optimizer.params.lr`), `warmup_type` (`linear` default, or `log`); WarmupCosineLR "
        "`warmup_min_ratio` (0), `cos_min_ratio` (1e-4), `warmup_type`; `cosine` `num_cycles` (0.5); "
        "`cosine_with_restarts` `num_cycles` (1); `polynomial` `power` (1.0), `lr_end` (1e-7). Any other key is refused.")


class WandbCfg(Block):
    enabled: bool = Field(False, description="Log loss, lr, throughput, memory and validation images to Weights & Biases "
                          "(rank 0); when false wandb is not imported and writes nothing. Without a network the run logs "
                          "offline to `output_dir/wandb/` and says so.")
    group: Optional[str] = Field(None, description="wandb group; null = none.")
    project: str = Field("ds-diffusers", description="wandb project.")
    entity: Optional[str] = Field(None, description="wandb entity; null = your default entity.")
    name: Optional[str] = Field(None, description="wandb run name; null = wandb picks one.")


class FlopsProfilerCfg(Block):
    enabled: bool = Field(False, description="Run DeepSpeed's flops profiler once, at `profile_step`.")
    profile_step: int = Field(1, ge=1, description="Training step at which the profile is taken.")
    module_depth: int = Field(-1, description="Depth of the per-module profile; -1 = every level.")
    top_modules: int = Field(1, ge=1, description="Number of top modules listed in the aggregated profile.")
    detailed: bool = Field(True, description="Print the detailed per-module profile.")
    output_file: Optional[str] = Field(None, description="File the profile is written to (its folder must exist, checked "
                                       "before any work); null = the log.")


class MonitorCfg(Block):
    """DeepSpeed's `tensorboard` and `csv_monitor` blocks, passed through."""

    enabled: bool = Field(False, description="Switch the monitor on.")
    output_path: str = Field("", description="Folder the monitor writes to (checked writable before any work); \"\" = "
                             "`output_dir/logs/tensorboard` (`tensorboard`) or `output_dir/logs/csv` (`csv_monitor`).")
    job_name: str = Field("ds-diffusers", description="Name of the run's subfolder under `output_path`.")


class OffloadParamCfg(Block):
    device: OffloadDevice = Field("none", description="`none`, `cpu` or `nvme`; `auto` (the seed's default) = `none`: "
                                  "offload is never switched on implicitly.")
    nvme_path: Optional[str] = Field(None, description="Folder on a fast local disk, required when `device` is `nvme` "
                                     "(checked before any work, with DeepSpeed's async_io op, which needs libaio).")
    pin_memory: bool = Field(False, description="Keep the offloaded tensors in pinned host memory.")


class OffloadOptimizerCfg(OffloadParamCfg):
    pass


def _knob(ge: Optional[int] = None, *, what: str) -> Any:
    """A ZeRO tuning knob: null leaves DeepSpeed's default, a value is passed to DeepSpeed as it is."""
    return Field(None, ge=ge, description=f"{what}. Passed to DeepSpeed when set; null = DeepSpeed's default.")


class ZeroCfg(Block):
    stage: int = Field(0, ge=0, le=3, description="ZeRO stage: 0 = none, 1 partitions the optimizer state over the ranks, "
                       "2 also the gradients, 3 also the parameters (the UNet is then loaded partitioned).")
    offload_param: OffloadParamCfg = Field(OffloadParamCfg(), description="Parameter offload (ZeRO stage 3 only).")
    offload_optimizer: OffloadOptimizerCfg = Field(OffloadOptimizerCfg(), description="Optimizer-state offload (ZeRO stage "
                                                   "1, 2 or 3). Not `nvme` with `use_ema`.")
    overlap_comm: Optional[bool] = _knob(what="Overlap the gradient reduction with the backward pass")
    contiguous_gradients: Optional[bool] = _knob(what="Copy gradients into one contiguous buffer as they are produced")
    reduce_scatter: Optional[bool] = _knob(what="Average gradients with reduce-scatter instead of all-reduce")
    reduce_bucket_size: Optional[int] = _knob(1, what="Elements reduced at a time")
    allgather_bucket_size: Optional[int] = _knob(1, what="Elements all-gathered at a time (stages 1 and 2)")
    round_robin_gradients: Optional[bool] = _knob(what="Stages 1 and 2: spread the gradient copies to the CPU over the "
                                                  "ranks in turn (with optimizer offload)")
    sub_group_size: Optional[int] = _knob(1, what="Stage 3: parameters per optimizer sub-group (the unit the optimizer "
                                          "steps and offload moves)")
    stage3_prefetch_bucket_size: Optional[int] = _knob(0, what="Stage 3: elements fetched ahead of their use")
    stage3_param_persistence_threshold: Optional[int] = _knob(0, what="Stage 3: parameters with fewer elements stay "
                                                              "whole on every rank")
    stage3_max_live_parameters: Optional[int] = _knob(0, what="Stage 3: most parameter elements gathered at once")
    stage3_max_reuse_distance: Optional[int] = _knob(0, what="Stage 3: a gathered parameter used again within this many "
                                                     "elements is kept")
    stage3_gather_16bit_weights_on_model_save: Optional[bool] = _knob(what="Stage 3: gather the 16-bit weights when "
                                                                      "DeepSpeed saves a model (ds-diffusers exports from "
                                                                      "the fp32 masters itself)")
