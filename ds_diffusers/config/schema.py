"""The typed config tree. Key names keep the seed project's (deepspeed-diffusers `cfg/default.json`)
so existing files load unchanged; every key added here is documented in README.md with its default.

Only shapes, types and ranges live here; checks that touch the disk or the accelerator are in
`checks.py`, and the translation to a DeepSpeed dict is in `deepspeed.py`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ds_diffusers.config.sample_schema import SampleCfg

OffloadDevice = Literal["none", "cpu", "nvme", "auto"]


class Block(BaseModel):
    """Strict: a JSON string is never silently read as a number or a bool."""

    model_config = ConfigDict(extra="forbid", strict=True)


class LoraCfg(Block):
    action: bool = False
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    target_modules: list[str] = ["to_k", "to_q", "to_v", "to_out.0"]
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # peft's `init_lora_weights`: true (zero B, the default), false (random), or a named scheme.
    init: Union[bool, Literal["gaussian", "pissa", "olora", "loftq"]] = True


class Fp16Cfg(Block):
    enabled: bool = False
    auto_cast: bool = False
    loss_scale: float = Field(0.0, ge=0.0)  # 0 = dynamic loss scaling
    initial_scale_power: int = Field(16, ge=0, le=64)
    loss_scale_window: int = Field(1000, ge=1)
    hysteresis: int = Field(2, ge=1)
    consecutive_hysteresis: bool = False
    min_loss_scale: float = Field(1.0, gt=0.0)


class Bf16Cfg(Block):
    enabled: bool = False


class ParamGroupCfg(Block):
    match: str = Field(min_length=1)  # a regular expression searched in the parameter name
    lr_scale: float = Field(1.0, gt=0.0)
    weight_decay: Optional[float] = Field(None, ge=0.0)


class OptimizerCfg(Block):
    type: str = "AdamW"
    params: dict[str, Any] = {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    param_groups: list[ParamGroupCfg] = []


class SchedulerCfg(Block):
    # DeepSpeed's names (the seed's) and diffusers' get_scheduler names; see config/schedules.py.
    type: Literal["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "constant", "constant_with_warmup", "linear", "cosine",
                  "cosine_with_restarts", "polynomial", "none"] = "WarmupLR"
    params: dict[str, Any] = {}


class WandbCfg(Block):
    enabled: bool = False
    group: Optional[str] = None
    project: str = "ds-diffusers"
    entity: Optional[str] = None
    name: Optional[str] = None


class FlopsProfilerCfg(Block):
    enabled: bool = False
    profile_step: int = Field(1, ge=1)
    module_depth: int = -1
    top_modules: int = Field(1, ge=1)
    detailed: bool = True
    output_file: Optional[str] = None


class MonitorCfg(Block):
    """DeepSpeed's `tensorboard` and `csv_monitor` blocks, passed through."""

    enabled: bool = False
    output_path: str = ""
    job_name: str = "ds-diffusers"


class OffloadParamCfg(Block):
    device: OffloadDevice = "none"
    nvme_path: Optional[str] = None
    pin_memory: bool = False


class OffloadOptimizerCfg(OffloadParamCfg):
    pass


class ZeroCfg(Block):
    stage: int = Field(0, ge=0, le=3)
    offload_param: OffloadParamCfg = OffloadParamCfg()
    offload_optimizer: OffloadOptimizerCfg = OffloadOptimizerCfg()
    # Tuning knobs passed to DeepSpeed as they are when set.
    overlap_comm: Optional[bool] = None
    contiguous_gradients: Optional[bool] = None
    reduce_scatter: Optional[bool] = None
    reduce_bucket_size: Optional[int] = Field(None, ge=1)
    allgather_bucket_size: Optional[int] = Field(None, ge=1)
    round_robin_gradients: Optional[bool] = None
    sub_group_size: Optional[int] = Field(None, ge=1)
    stage3_prefetch_bucket_size: Optional[int] = Field(None, ge=0)
    stage3_param_persistence_threshold: Optional[int] = Field(None, ge=0)
    stage3_max_live_parameters: Optional[int] = Field(None, ge=0)
    stage3_max_reuse_distance: Optional[int] = Field(None, ge=0)
    stage3_gather_16bit_weights_on_model_save: Optional[bool] = None


class Config(Block):
    # --- run length and cadence (seed keys)
    num_epochs: int = Field(1, ge=1)
    max_train_steps: int = Field(0, ge=0)  # optimizer steps; 0 = use num_epochs
    validation_epochs: int = Field(0, ge=0)  # 0 = no epoch-based validation
    validation_steps: int = Field(0, ge=0)  # 0 = no step-based validation
    num_validation_images: int = Field(4, ge=1)
    validation_inference_steps: int = Field(25, ge=1)
    validation_guidance_scale: float = Field(7.5, ge=0.0)
    validation_prompts: list[str] = []
    validation_use_ema: Optional[bool] = None  # None = true when use_ema: validation images from the EMA weights
    save_interval: int = Field(500, ge=0)  # optimizer steps between checkpoints; 0 = only at the end (500 as diffusers')
    checkpoints_total_limit: int = Field(3, ge=1)
    log_every_n_steps: int = Field(10, ge=1)  # optimizer steps between log points (loss, stop signals)
    max_nonfinite_steps: int = Field(10, ge=1)  # nan/inf losses in a row before training stops
    overwrite_output_dir: bool = False
    seed: int = Field(42, ge=0)
    # --- paths (seed keys)
    pretrained_model_name_or_path: str = Field(min_length=1)
    dataset_dir: str = Field(min_length=1)
    max_train_samples: Optional[int] = Field(None, ge=1)  # train on this many rows (a seeded random subset); null = all
    imagefolder: bool = False
    checkpoint_dir: str = "outputs/checkpoints"
    output_dir: str = "outputs/model"
    resume_from_checkpoint: Union[bool, str] = False
    # --- hub ids in the path keys (docs/hub.md); revision/variant as diffusers' --revision/--variant
    revision: Optional[str] = Field(None, min_length=1)  # branch, tag or commit of a hub-id model; null = main
    variant: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_]+$")  # weights file variant, e.g. "fp16" (*.fp16.safetensors)
    dataset_revision: Optional[str] = Field(None, min_length=1)  # branch, tag or commit of a hub-id dataset; null = main
    # --- data (seed keys + columns)
    image_column: Optional[str] = None
    caption_column: Optional[str] = None
    resolution: int = Field(512, ge=8)
    center_crop: bool = False
    random_flip: bool = False
    dataloader_num_workers: Optional[int] = Field(None, ge=0)  # None = min(8, CPUs available - 1)
    skip_bad_images: bool = False  # skip (and report) unreadable/missing images instead of stopping
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)  # probability a sample trains on the empty prompt
    # --- cache of the frozen encoders' outputs (computed once, reused while its key matches)
    cache_latents: bool = False
    cache_text_embeddings: bool = False
    cache_dir: str = "data/cache"
    # --- model and objective
    use_lora: LoraCfg = LoraCfg()
    use_ema: bool = False
    ema_decay: float = Field(0.9999, gt=0.0, lt=1.0)
    ema_update_after_step: int = Field(0, ge=0)
    export_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # dtype of the exported weights (from the fp32 masters)
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None
    noise_offset: float = Field(0.0, ge=0.0)
    input_perturbation: float = Field(0.0, ge=0.0)  # diffusers' --input_perturbation (0.1 is their suggestion)
    snr_gamma: Optional[float] = Field(None, gt=0.0)
    gradient_checkpointing: bool = False
    vae_path: Optional[str] = None  # a diffusers VAE folder used instead of the model's vae/ (e.g. an fp16-safe SDXL VAE)
    # --- kernels (numerics-neutral except allow_tf32)
    allow_tf32: Optional[bool] = None  # None = true on CUDA
    channels_last: bool = False
    compile: bool = False
    # --- DeepSpeed
    use_fp16: Fp16Cfg = Fp16Cfg()
    bf16: Bf16Cfg = Bf16Cfg()
    train_micro_batch_size_per_gpu: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_clipping: float = Field(1.0, ge=0.0)  # 0 = no clipping; 1.0 as diffusers' --max_grad_norm
    optimizer: OptimizerCfg = OptimizerCfg()
    scheduler: SchedulerCfg = SchedulerCfg()
    lr_warmup_steps: int = Field(0, ge=0)
    zero_optimization: ZeroCfg = ZeroCfg()
    wall_clock_breakdown: bool = False
    flops_profiler: FlopsProfilerCfg = FlopsProfilerCfg()
    # --- logging
    offline: bool = False  # wandb offline mode
    wandb: WandbCfg = WandbCfg()
    tensorboard: MonitorCfg = MonitorCfg()
    csv_monitor: MonitorCfg = MonitorCfg()
    sample: SampleCfg = SampleCfg()

    @property
    def validates_with_ema(self) -> bool:
        return self.use_ema if self.validation_use_ema is None else self.validation_use_ema

    @property
    def weight_dtype_name(self) -> str:
        """Precision of the frozen components (and of the UNet's compute in the engine)."""
        if self.use_fp16.enabled:
            return "float16"
        if self.bf16.enabled:
            return "bfloat16"
        return "float32"
