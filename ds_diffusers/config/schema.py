"""The typed config tree. Key names keep the seed project's (deepspeed-diffusers `cfg/default.json`)
so existing files load unchanged. Every key carries its description here, and each top-level key the
section of the reference it is listed under; `docs/config.md` is generated from them
(`python -m ds_diffusers.config.docs --write`). The config itself stays flat: sections are for reading.

Only shapes, types and ranges live here (the nested blocks in `blocks.py`); checks that touch the
disk or the accelerator are in `checks.py`, and the translation to a DeepSpeed dict is in `deepspeed.py`.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field

from ds_diffusers.config.blocks import (Bf16Cfg, Block, FlopsProfilerCfg, Fp16Cfg, LoraCfg, MonitorCfg, OffloadDevice,
                                        OffloadOptimizerCfg, OffloadParamCfg, OptimizerCfg, ParamGroupCfg, SchedulerCfg,
                                        WandbCfg, ZeroCfg)
from ds_diffusers.config.sample_schema import SampleCfg

__all__ = ["Bf16Cfg", "Block", "Config", "FlopsProfilerCfg", "Fp16Cfg", "LoraCfg", "MonitorCfg", "OffloadDevice",
           "OffloadOptimizerCfg", "OffloadParamCfg", "OptimizerCfg", "ParamGroupCfg", "SECTIONS", "SampleCfg",
           "SchedulerCfg", "WandbCfg", "ZeroCfg", "section_of"]

# The sections of docs/config.md, in reading order.
SECTIONS = ("Model", "Data", "Encoder cache", "Run length and batch", "Objective", "Optimizer and learning rate",
            "Precision and ZeRO", "Memory and kernels", "LoRA", "EMA", "Validation", "Checkpoints and export",
            "Logging and profiling", "Sampling")


def _in(section: str) -> dict[str, str]:
    """Schema metadata naming the section a top-level key is listed under."""
    if section not in SECTIONS:
        raise ValueError(f"unknown config section {section!r}; use one of {SECTIONS}")
    return {"section": section}


MODEL, DATA, CACHE, RUN, OBJECTIVE = _in("Model"), _in("Data"), _in("Encoder cache"), _in("Run length and batch"), _in("Objective")
OPTIMIZER, PRECISION, KERNELS = _in("Optimizer and learning rate"), _in("Precision and ZeRO"), _in("Memory and kernels")
LORA, EMA, VALIDATION, CHECKPOINTS = _in("LoRA"), _in("EMA"), _in("Validation"), _in("Checkpoints and export")
LOGGING, SAMPLING = _in("Logging and profiling"), _in("Sampling")


class Config(Block):
    # --- run length and cadence (seed keys)
    num_epochs: int = Field(1, ge=1, json_schema_extra=RUN, description="Epochs to train when `max_train_steps` is 0.")
    max_train_steps: int = Field(0, ge=0, json_schema_extra=RUN, description="Optimizer steps to train; 0 = `num_epochs` epochs.")
    validation_epochs: int = Field(0, ge=0, json_schema_extra=VALIDATION, description="Validation (images, held-out loss) every N epochs; 0 = off.")
    validation_steps: int = Field(0, ge=0, json_schema_extra=VALIDATION,
                                  description="Validation (images, held-out loss) every N optimizer steps; 0 = off.")
    num_validation_images: int = Field(4, ge=1, json_schema_extra=VALIDATION, description="Images per prompt in the validation grid.")
    validation_inference_steps: int = Field(25, ge=1, json_schema_extra=VALIDATION, description="Sampler steps for validation images.")
    validation_guidance_scale: float = Field(7.5, ge=0.0, json_schema_extra=VALIDATION,
                                             description="Classifier-free guidance scale for validation images.")
    validation_prompts: list[str] = Field([], json_schema_extra=VALIDATION, description="Prompts of the validation grid; "
                                          "validation (`validation_steps` or `validation_epochs` > 0) needs them, "
                                          "`validation_split`, or both.")
    validation_use_ema: Optional[bool] = Field(None, json_schema_extra=VALIDATION, description="Validation images from the "
                                               "EMA weights; null = true when `use_ema` (true without `use_ema` is an error).")
    validation_split: float = Field(0, ge=0, json_schema_extra=VALIDATION, description="Rows held out of training for the "
                                    "validation loss: a fraction (0 < x < 1) of the dataset, or a whole number >= 1 of rows, "
                                    "chosen by `seed` before `max_train_samples`; 0 = none. With it, each validation (same "
                                    "cadence as the images) logs `val_loss`, the denoising loss on these rows averaged over "
                                    "`validation_loss_timesteps` fixed timesteps with fixed noise (docs/run-semantics.md).")
    validation_dataset_dir: Optional[str] = Field(None, json_schema_extra=VALIDATION, description="A local dataset folder "
                                                  "(the layouts and `imagefolder` of `dataset_dir`, the same columns) whose "
                                                  "rows are the held-out rows, instead of `validation_split`.")
    validation_loss_timesteps: int = Field(8, ge=1, le=1000, json_schema_extra=VALIDATION, description="Evenly spaced "
                                           "timesteps the validation loss averages over (a flow family: sigmas in [0, 1], "
                                           "unshifted), 8 as MLPerf's Flux benchmark.")
    save_interval: int = Field(500, ge=0, json_schema_extra=CHECKPOINTS, description="Checkpoint every N optimizer steps (and "
                               "always at the end and on a stop signal); 0 = only at the end. 500 = diffusers' "
                               "`--checkpointing_steps`.")
    checkpoints_total_limit: int = Field(3, ge=1, json_schema_extra=CHECKPOINTS,
                                         description="Keep the newest N complete checkpoints; older ones are deleted.")
    log_every_n_steps: int = Field(10, ge=1, json_schema_extra=LOGGING, description="Optimizer steps between log points. "
                                   "Each logs the mean loss since the previous one (also at the first step of a start, every "
                                   "save point and the last step), and is when stop signals are acted on.")
    max_nonfinite_steps: int = Field(10, ge=1, json_schema_extra=RUN, description="A nan/inf loss in this many optimizer "
                                     "steps in a row (on any rank) stops the run at the next log point (exit code 3); fewer "
                                     "are skipped (the update is not applied and the schedule does not advance).")
    overwrite_output_dir: bool = Field(False, json_schema_extra=CHECKPOINTS, description="Allow a fresh run into folders "
                                       "holding another run's checkpoints or results (they are replaced); false = such a "
                                       "start is refused.")
    seed: int = Field(42, ge=0, json_schema_extra=RUN, description="Seed of everything (data order, crops, flips, caption "
                      "choice and dropout, noise, timesteps); per-rank streams are derived from it. Below 2**63.")
    # --- paths (seed keys)
    pretrained_model_name_or_path: str = Field(min_length=1, json_schema_extra=MODEL, description="A diffusers model "
                                               "folder (the one holding `model_index.json`) or a hub id `org/name` (resolved once "
                                               "at start-up to the Hugging Face cache, docs/hub.md; an existing local folder "
                                               "wins); its parts are checked before any work (configs readable, weights present, "
                                               "SDXL's second text encoder).")
    dataset_dir: str = Field(min_length=1, json_schema_extra=DATA, description="Dataset folder, or a hub "
                             "dataset id `org/name` resolved like the model's: a `datasets` `save_to_disk` folder, a hub-layout folder of parquet/arrow files, or an imagefolder "
                             "(with `imagefolder: true`). Every image file it names is checked to exist before training.")
    max_train_samples: Optional[int] = Field(None, ge=1, json_schema_extra=DATA, description="Train on this many rows, the "
                                             "first N of a `seed`-shuffled order (the subset diffusers' "
                                             "`--max_train_samples` takes for the same seed); null = all rows.")
    imagefolder: bool = Field(False, json_schema_extra=DATA, description="Read `dataset_dir` as an imagefolder: images "
                              "with their captions in `metadata.jsonl` or `metadata.csv`.")
    dataset_format: Literal["datasets", "webdataset"] = Field("datasets", json_schema_extra=DATA, description="\"datasets\": "
                                                          "`dataset_dir` is read with the `datasets` library (the layouts "
                                                          "above). \"webdataset\": `dataset_dir` is a folder of WebDataset "
                                                          "`.tar` shards, streamed: each process reads only its share of the "
                                                          "shards, for data bigger than a node (docs/data.md). Raw shards hold "
                                                          "an image and a caption per sample, pre-encoded ones the frozen "
                                                          "encoders' outputs.")
    shard_partitions: int = Field(8, ge=1, json_schema_extra=DATA, description="`dataset_format: webdataset`: the shards "
                                  "are dealt into this many partitions read side by side. The sample order depends on it "
                                  "and `seed` only, not on the process or worker count, so a run may resume on another "
                                  "process count; it must be a multiple of the process count and at most the shard count.")
    checkpoint_dir: str = Field("outputs/checkpoints", json_schema_extra=CHECKPOINTS,
                                description="Folder of the DeepSpeed checkpoints (`step_<N>/`, `latest`).")
    output_dir: str = Field("outputs/model", json_schema_extra=CHECKPOINTS, description="Exported model (`unet/` or "
                            "`pytorch_lora_weights.safetensors`, `unet_ema/`), `ds_config.json` (the DeepSpeed dict of "
                            "every run), `validation/` and `logs/metrics.jsonl`.")
    resume_from_checkpoint: Union[bool, str] = Field(False, json_schema_extra=CHECKPOINTS, description="true or "
                                                     "\"latest\": resume from `checkpoint_dir/latest` when it exists (a fresh "
                                                     "start otherwise; a damaged newest checkpoint falls back to the "
                                                     "previous intact one with a warning); a step folder path: resume that "
                                                     "one; false: never resume.")
    revision: Optional[str] = Field(None, min_length=1, json_schema_extra=MODEL, description="Branch, tag or commit of "
                                    "a hub-id model (diffusers' `--revision`); null = main. Refused with a local folder.")
    variant: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_]+$", json_schema_extra=MODEL, description="Weights-file "
                                   "variant, e.g. \"fp16\" for `*.fp16.safetensors` (diffusers' `--variant`); only that "
                                   "variant's weights are downloaded and loaded; the export writes plain names.")
    dataset_revision: Optional[str] = Field(None, min_length=1, json_schema_extra=DATA, description="Branch, tag or commit "
                                            "of a hub-id `dataset_dir`; null = main.")
    # --- data (seed keys + columns)
    image_column: Optional[str] = Field(None, json_schema_extra=DATA, description="Column holding the images; null = the "
                                        "first column of image type, else `image`.")
    caption_column: Optional[str] = Field(None, json_schema_extra=DATA, description="Column holding the captions (strings, "
                                          "or lists of strings of which one is drawn per sample and epoch); null = the "
                                          "first of `text`, `caption`, `captions`, `prompt`.")
    resolution: int = Field(512, ge=8, json_schema_extra=DATA, description="Training resolution in pixels; a multiple of 8 "
                            "(the VAE downsamples by 8). Images are resized (bilinear) on the short side, then cropped square.")
    center_crop: bool = Field(False, json_schema_extra=DATA, description="Center crop after resizing the short side; "
                              "false = a random crop, drawn per (seed, epoch, sample).")
    random_flip: bool = Field(False, json_schema_extra=DATA,
                              description="Random horizontal flip, drawn per (seed, epoch, sample).")
    aspect_ratio_buckets: bool = Field(False, json_schema_extra=DATA, description="Train each image at the bucket shape "
                                       "of nearest aspect ratio at the area `resolution`² (or one of `bucket_resolutions`), "
                                       "resized to cover it and cropped by what the aspect ratios differ, instead of a square "
                                       "crop; each micro-batch comes from one bucket, the same on every rank (docs/data.md). "
                                       "`cache_latents` stores each bucket's latents at its shape. false = diffusers' square crops.")
    bucket_resolutions: list[int] = Field([], json_schema_extra=DATA, description="Multi-resolution buckets: target sides "
                                          "(area side²); an image trains at the largest area it covers without upscaling "
                                          "(the smallest when it covers none). [] = [`resolution`].")
    bucket_step: int = Field(64, ge=8, json_schema_extra=DATA, description="Bucket widths and heights are multiples of "
                             "this: the VAE's factor (8) × the denoiser's downsampling (8 for SD 1.x/2.x UNets, 4 for SDXL's; "
                             "a transformer's patch size), so latents divide evenly; checked against the model's configs.")
    dataloader_num_workers: Optional[int] = Field(None, ge=0, json_schema_extra=DATA, description="DataLoader worker "
                                                  "processes per rank; null = min(8, CPUs this process may run on − 1) "
                                                  "(`os.sched_getaffinity`, so Slurm's `--cpus-per-task` counts). Workers "
                                                  "are persistent and keep 2 batches each ready; results do not depend on "
                                                  "the count (exact resume included).")
    skip_bad_images: bool = Field(False, json_schema_extra=DATA, description="An image that is missing or cannot be "
                                  "decoded is skipped (the next readable row takes its place), announced once and counted at "
                                  "the end, instead of stopping the run. Not with `cache_latents`.")
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, json_schema_extra=DATA, description="Probability that a sample's "
                                   "caption is replaced by the empty prompt, which teaches the model the unconditional "
                                   "prediction classifier-free guidance needs (SD itself was trained with 0.1); drawn per "
                                   "(seed, epoch, sample), so cached, uncached and resumed runs drop the same samples.")
    # --- cache of the frozen encoders' outputs (computed once, reused while its key matches)
    cache_latents: bool = Field(False, json_schema_extra=CACHE, description="Encode every image with the frozen VAE once "
                                "and train from the stored posterior (mean and log-variance: every step still draws a "
                                "fresh latent, with the random numbers an uncached run draws). Needs `center_crop: true`; "
                                "`random_flip` stores the mirrored image too.")
    cache_text_embeddings: bool = Field(False, json_schema_extra=CACHE, description="Encode every distinct caption with "
                                        "the frozen text encoder once and reuse the stored outputs.")
    text_encoder_zero3: bool = Field(False, json_schema_extra=CACHE, description="Load the text encoders partitioned "
                                     "over the processes by ZeRO-3 (inference: each layer gathered in its forward) for the "
                                     "pre-pass that fills the text cache, so no process holds a whole T5-XXL or Qwen2.5-VL; "
                                     "they are freed before training. Needs `cache_text_embeddings: true` on a datasets input "
                                     "(see docs/data.md, the text pre-pass).")
    cache_dir: str = Field("data/cache", json_schema_extra=CACHE, description="Where the caches live: a `latents-<key>` or "
                           "`text-<key>` folder per combination of encoder files, weight dtype, resolution, crop/flip, "
                           "column and dataset (a change builds a new folder; old ones are never deleted), and `datasets/`, "
                           "the Arrow cache `datasets` builds of a hub-layout or imagefolder dataset (its size is printed "
                           "at start; delete it to free the space). Must be shared by all nodes of a multi-node run.")
    # --- model and objective
    use_lora: LoraCfg = Field(LoraCfg(), json_schema_extra=LORA, description="peft LoRA adapters on the UNet's attention "
                              "projections (the seed's key); off by default.")
    use_ema: bool = Field(False, json_schema_extra=EMA, description="Keep an exponential moving average of the UNet "
                          "weights (full fine-tune only, not with LoRA), partitioned over the ranks as the weights are "
                          "(ZeRO-3) and exported as `unet_ema/`. Not with NVMe offload.")
    ema_decay: float = Field(0.9999, gt=0.0, lt=1.0, json_schema_extra=EMA, description="EMA decay; the effective decay "
                             "ramps up as min(decay, (1 + k) / (10 + k)), as diffusers' EMAModel.")
    ema_update_after_step: int = Field(0, ge=0, json_schema_extra=EMA,
                                       description="The EMA copies the weights until this step, then averages.")
    export_dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", json_schema_extra=CHECKPOINTS, description="Dtype of the "
                                                          "exported weights (`unet/`, `unet_ema/`, LoRA file), cast from "
                                                          "the fp32 masters; used by the end-of-run and the offline "
                                                          "export alike.")
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = Field(None, json_schema_extra=OBJECTIVE, description=
                                                                          "What the UNet learns to predict; null = what the "
                                                                          "model's scheduler config says.")
    noise_offset: float = Field(0.0, ge=0.0, json_schema_extra=OBJECTIVE, description="Offset-noise strength (helps very "
                                "dark or bright images), as diffusers' `--noise_offset`; 0 = off.")
    input_perturbation: float = Field(0.0, ge=0.0, json_schema_extra=OBJECTIVE, description="Input-perturbation strength "
                                      "as diffusers' `--input_perturbation` (0.1 is their suggestion): the noisy latents use "
                                      "noise + strength × a second normal draw, the target stays the first noise; 0 = off.")
    snr_gamma: Optional[float] = Field(None, gt=0.0, json_schema_extra=OBJECTIVE, description="Min-SNR loss weighting "
                                       "gamma (5.0 is the usual value); null = plain MSE.")
    weighting_scheme: Optional[Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"]] = Field(
        None, json_schema_extra=OBJECTIVE, description="Flow-matching families only (Flux, SD 3.x): diffusers' "
        "`--weighting_scheme`. logit_normal and mode draw the sigmas from that density (uniform weights); sigma_sqrt "
        "and cosmap weight the loss (uniform sigmas); none does neither; null = the family's default.")
    logit_mean: float = Field(0.0, json_schema_extra=OBJECTIVE, description="Flow matching, logit_normal: mean of the "
                              "normal whose sigmoid is the sigma draw, as diffusers' `--logit_mean`.")
    logit_std: float = Field(1.0, gt=0.0, json_schema_extra=OBJECTIVE, description="Flow matching, logit_normal: its "
                             "standard deviation, as diffusers' `--logit_std`.")
    mode_scale: float = Field(1.29, ge=-1.0, le=1.75, json_schema_extra=OBJECTIVE, description="Flow matching, mode: the "
                              "SD3 paper's scale s, as diffusers' `--mode_scale`; within [-1, 1.75] the density's map "
                              "is monotone.")
    flow_shift: Optional[float] = Field(None, gt=0.0, json_schema_extra=OBJECTIVE, description="Flow matching: the "
                                        "timestep shift of the training sigmas (σ' = sσ / (1 + (s − 1)σ), larger = "
                                        "noisier); null = the `shift` of the model's scheduler config.")
    gradient_checkpointing: bool = Field(False, json_schema_extra=KERNELS, description="Recompute the UNet's activations "
                                         "in the backward pass to save memory.")
    vae_path: Optional[str] = Field(None, json_schema_extra=MODEL, description="A local diffusers VAE folder used instead "
                                    "of the model's `vae/` (e.g. an fp16-safe SDXL VAE); null = the model's own.")
    # --- kernels (numerics-neutral except allow_tf32)
    allow_tf32: Optional[bool] = Field(None, json_schema_extra=KERNELS, description="TF32 matmuls and convolutions for "
                                       "fp32 compute on Ampere and newer GPUs; null = true on CUDA. No effect on CPUs or on "
                                       "fp16/bf16 compute. Changes results in the last bits, like cuDNN's algorithm choice.")
    channels_last: bool = Field(False, json_schema_extra=KERNELS, description="Feed the UNet its input latents in "
                                "channels-last (NHWC) memory format, so cuDNN picks its NHWC convolution kernels (the "
                                "weights keep the layout DeepSpeed needs); the same losses.")
    compile: bool = Field(False, json_schema_extra=KERNELS, description="`torch.compile` the UNet through DeepSpeed's "
                          "`engine.compile()`; the first steps take longer (compilation), the loss is the same to float "
                          "tolerance.")
    # --- DeepSpeed
    use_fp16: Fp16Cfg = Field(Fp16Cfg(), json_schema_extra=PRECISION, description="fp16 mixed precision: DeepSpeed's "
                              "`fp16` block under the seed's name. The frozen encoders run in fp16 too.")
    bf16: Bf16Cfg = Field(Bf16Cfg(), json_schema_extra=PRECISION, description="bf16 mixed precision: DeepSpeed's `bf16` "
                          "block. The frozen encoders run in bf16 too.")
    train_micro_batch_size_per_gpu: int = Field(1, ge=1, json_schema_extra=RUN,
                                                description="Samples per process per micro step.")
    gradient_accumulation_steps: int = Field(1, ge=1, json_schema_extra=RUN, description="Micro steps per optimizer step; "
                                             "DeepSpeed's `train_batch_size` = micro batch × accumulation × processes. A "
                                             "window never spans two epochs (a shorter last window still steps). Under "
                                             "fp16/bf16 with more than 1, gradients are summed in fp32 "
                                             "(`data_types.grad_accum_dtype`), which DeepSpeed does from ZeRO-1 on (16-bit "
                                             "runs always run ZeRO >= 1).")
    gradient_clipping: float = Field(1.0, ge=0.0, json_schema_extra=OPTIMIZER, description="Clip the global gradient norm "
                                     "to this value (1.0 = diffusers' `--max_grad_norm`); 0 = off.")
    optimizer: OptimizerCfg = Field(OptimizerCfg(), json_schema_extra=OPTIMIZER,
                                    description="The optimizer DeepSpeed builds (its `optimizer` block).")
    scheduler: SchedulerCfg = Field(SchedulerCfg(), json_schema_extra=OPTIMIZER, description="The learning-rate schedule: "
                                    "one torch `LambdaLR` over that optimizer, handed to `deepspeed.initialize`.")
    lr_warmup_steps: int = Field(0, ge=0, json_schema_extra=OPTIMIZER, description="Warm-up steps used when "
                                 "`scheduler.params.warmup_num_steps` is absent; 0 = the full lr from the first step.")
    zero_optimization: ZeroCfg = Field(ZeroCfg(), json_schema_extra=PRECISION, description="DeepSpeed's ZeRO block.")
    wall_clock_breakdown: bool = Field(False, json_schema_extra=LOGGING, description="DeepSpeed's timing breakdown of "
                                       "forward, backward and step.")
    flops_profiler: FlopsProfilerCfg = Field(FlopsProfilerCfg(), json_schema_extra=LOGGING,
                                             description="DeepSpeed's flops profiler block, passed through.")
    # --- logging
    offline: bool = Field(False, json_schema_extra=LOGGING, description="wandb offline mode (upload later with `wandb sync`).")
    wandb: WandbCfg = Field(WandbCfg(), json_schema_extra=LOGGING, description="Weights & Biases logging (rank 0).")
    tensorboard: MonitorCfg = Field(MonitorCfg(), json_schema_extra=LOGGING, description="DeepSpeed's TensorBoard monitor "
                                    "(needs the `tensorboard` package, pinned in requirements.txt).")
    csv_monitor: MonitorCfg = Field(MonitorCfg(), json_schema_extra=LOGGING, description="DeepSpeed's CSV monitor.")
    sample: SampleCfg = Field(SampleCfg(), json_schema_extra=SAMPLING, description="Settings of `python -m "
                              "ds_diffusers.sample` (baseline vs tuned images from the file that trained the model).")

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


def section_of(key: str) -> str:
    """The section a top-level key is listed under."""
    return Config.model_fields[key].json_schema_extra["section"]
