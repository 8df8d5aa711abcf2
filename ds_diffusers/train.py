"""Training entrypoint: `python -m ds_diffusers.train --cfg PATH [--set key.sub=value ...]`, also
started as `deepspeed [--num_gpus N] --module ds_diffusers.train --cfg PATH`.

This is the one file that knows the order of the steps:
config -> models -> data -> DeepSpeed engine -> (resume) -> loop -> checkpoint -> export.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ds_diffusers import checkpoint, lock, preemption, validation
from ds_diffusers.config import Config, check_environment, load_config, parse_cfg_args, to_deepspeed_config
from ds_diffusers.config.checks import fused_adam_unavailable
from ds_diffusers.config.hub import resolve_hub_ids
from ds_diffusers.config.schedules import lr_scheduler_factory
from ds_diffusers.data import (build_train_dataloader, check_dataset_size, check_image_files, default_num_workers,
                               load_train_dataset, num_batches_per_epoch, prepare_caches, resolve_columns,
                               select_train_samples, to_device)
from ds_diffusers.distributed import DistInfo, barrier, broadcast_from_main, init_distributed, shutdown_distributed
from ds_diffusers.ema import ShardedEMA
from ds_diffusers.errors import ConfigError, TrainingError
from ds_diffusers.export import export_model
from ds_diffusers.metrics import RunLogger
from ds_diffusers.models import (DTYPES, attention_description, build_unet, load_frozen_components, param_groups, set_tf32)
from ds_diffusers.nonfinite import check_weights_before_writing, nonfinite_stop_message, skip_nonfinite_steps
from ds_diffusers.objective import diffusion_loss, encode_batch
from ds_diffusers.quiet import quiet_known_notices
from ds_diffusers.step_window import StepWindow


class Preempted(Exception):
    """The run saved a checkpoint and stopped on a signal; it is meant to be started again."""


@dataclass(frozen=True)
class RunPlan:
    """Run length in optimizer steps; `max_train_steps` wins over `num_epochs` when set.

    An accumulation window never spans two epochs: the last micro-batches of an epoch, fewer than
    `gradient_accumulation_steps`, still make an optimizer step (as accelerate does in diffusers'
    script). Windows are placed by the position in the epoch, which a checkpoint stores, so a
    resumed run cuts them in the same places."""

    batches_per_epoch: int
    accumulation_steps: int
    steps_per_epoch: int
    total_steps: int
    num_epochs: int

    @classmethod
    def from_config(cls, cfg: Config, dataset_len: int, world_size: int) -> "RunPlan":
        batches = num_batches_per_epoch(dataset_len, cfg.train_micro_batch_size_per_gpu, world_size)
        steps_per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
        total = cfg.max_train_steps or cfg.num_epochs * steps_per_epoch
        epochs = math.ceil(total / steps_per_epoch)
        return cls(batches_per_epoch=batches, accumulation_steps=cfg.gradient_accumulation_steps,
                   steps_per_epoch=steps_per_epoch, total_steps=total, num_epochs=epochs)

    def ends_window(self, batch_in_epoch: int) -> bool:
        """Whether micro-batch `batch_in_epoch` (0-based) is the last of its accumulation window."""
        return (batch_in_epoch + 1) % self.accumulation_steps == 0 or batch_in_epoch + 1 == self.batches_per_epoch


def zero_description(cfg: Config, ds_config: dict, loaded_partitioned: bool = False) -> str:
    engine_stage = ds_config["zero_optimization"]["stage"]
    if engine_stage == 3:
        # Users compare the peak memory per rank with DeepSpeed's estimate; say which load ran.
        return "ZeRO-3 (UNet " + ("loaded partitioned)" if loaded_partitioned else "loaded whole on every rank, then partitioned)")
    if engine_stage == cfg.zero_optimization.stage:
        return f"ZeRO-{engine_stage}"
    reason = "fp32 gradient accumulation needs ZeRO >= 1" if engine_stage == 1 else "one process has nothing to partition"
    return f"ZeRO-{cfg.zero_optimization.stage} (run as ZeRO-{engine_stage}: {reason})"


def kernel_description(cfg: Config, unet: torch.nn.Module, accelerator_name: str, tf32: bool) -> str:
    options = [name for name, on in (("TF32", tf32 and accelerator_name == "cuda"), ("channels_last", cfg.channels_last),
                                     ("compiled", cfg.compile)) if on]
    return ", ".join([attention_description(unet, accelerator_name), *options])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_batches(loader, sampler, dataset, start_epoch: int, num_epochs: int, start_in_epoch: int):
    """(epoch, batch) pairs from `start_epoch` on, skipping the `start_in_epoch` samples this rank
    already consumed (resume); each epoch ends with (epoch, None)."""
    for epoch in range(start_epoch, num_epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        sampler.set_start(start_in_epoch if epoch == start_epoch else 0)
        for batch in loader:
            yield epoch, batch
        yield epoch, None


def run_validation(cfg: Config, dist: DistInfo, frozen, engine, global_step: int, logger: RunLogger, ema=None) -> None:
    """All ranks: the EMA swap may gather, and under ZeRO-3 the forward gathers parameters collectively;
    without ZeRO-3 rank 0 alone generates."""
    zero3 = cfg.zero_optimization.stage == 3
    with validation.weights(ema if cfg.validates_with_ema else None):
        _generate_validation(cfg, dist, frozen, engine, global_step, logger, zero3)
    barrier()


def _generate_validation(cfg: Config, dist: DistInfo, frozen, engine, global_step: int, logger: RunLogger, zero3: bool) -> None:
    if zero3 or dist.is_main:
        # The training RNG streams must not notice validation, or resumed runs would diverge.
        with torch.random.fork_rng(devices=[]):
            rows = validation.generate(
                frozen, engine.module, cfg.validation_prompts, num_images=cfg.num_validation_images, seed=cfg.seed,
                resolution=cfg.resolution, num_inference_steps=cfg.validation_inference_steps,
                guidance_scale=cfg.validation_guidance_scale,
            )
        if dist.is_main:
            path = validation.save_validation_grid(rows, cfg.validation_prompts, cfg.output_dir, global_step)
            logger.log_images(global_step, str(path), cfg.validation_prompts)


def train(cfg: Config) -> Path | None:
    # Data problems (missing columns, too few rows) surface before any process group exists.
    hf_dataset = select_train_samples(load_train_dataset(cfg.dataset_dir, cfg.imagefolder), cfg.max_train_samples, cfg.seed)
    image_column, caption_column = resolve_columns(hf_dataset, cfg.image_column, cfg.caption_column)
    missing_images = check_image_files(hf_dataset, image_column, cfg.skip_bad_images)

    lock.check_not_locked(cfg)
    resume_from = checkpoint.resume_target(cfg)
    if resume_from is None:
        checkpoint.check_fresh_start(cfg)

    dist = init_distributed()
    check_dataset_size(len(hf_dataset), cfg.train_micro_batch_size_per_gpu, dist.world_size)
    # The folders are created here, with their locks, once every check of the input has passed.
    refusal = broadcast_from_main(lock.lock_run_folders(cfg) if dist.is_main else None)
    if refusal is not None:
        raise refusal
    if resume_from is None and dist.is_main:
        checkpoint.clear_previous_run(cfg)
    barrier()

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator_name = get_accelerator().device_name()
    tf32 = cfg.allow_tf32 if cfg.allow_tf32 is not None else accelerator_name == "cuda"
    set_tf32(tf32)
    seed_everything(cfg.seed)  # same on every rank while the models (and LoRA init) are built
    weight_dtype = DTYPES[cfg.weight_dtype_name]
    frozen = load_frozen_components(cfg.pretrained_model_name_or_path, dist.device, weight_dtype, cfg.prediction_type,
                                    cfg.vae_path, cfg.variant)
    fused_adam_problem = fused_adam_unavailable(get_accelerator()) if accelerator_name != "cpu" else None
    ds_config = to_deepspeed_config(cfg, world_size=dist.world_size, accelerator_name=accelerator_name,
                                    fused_adam_ok=fused_adam_problem is None)
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    unet = build_unet(cfg, ds_config if zero3 else None, dist.rank)
    loaded_partitioned = hasattr(next(unet.parameters()), "ds_id")
    groups = param_groups(unet, cfg)
    num_trainable = sum(getattr(p, "ds_numel", p.numel()) for group in groups for p in group["params"])

    latent_cache, text_cache = prepare_caches(cfg, hf_dataset, image_column, caption_column, frozen, dist)
    num_workers = cfg.dataloader_num_workers if cfg.dataloader_num_workers is not None else default_num_workers()
    loader, sampler, dataset = build_train_dataloader(
        hf_dataset, image_column, caption_column, frozen.tokenizer, resolution=cfg.resolution, center_crop=cfg.center_crop,
        random_flip=cfg.random_flip, seed=cfg.seed, micro_batch_size=cfg.train_micro_batch_size_per_gpu,
        num_workers=num_workers, rank=dist.rank, world_size=dist.world_size,
        latent_cache=latent_cache, text_cache=text_cache, pin_memory=accelerator_name != "cpu",
        skip_bad_images=cfg.skip_bad_images, known_bad_rows=missing_images, caption_dropout=cfg.caption_dropout,
        tokenizer_2=frozen.tokenizer_2, record_crop=frozen.family == "sdxl",
    )
    plan = RunPlan.from_config(cfg, len(hf_dataset), dist.world_size)

    if dist.is_main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    engine, _, _, lr_scheduler = deepspeed.initialize(model=unet, model_parameters=groups, config=ds_config,
                                                      lr_scheduler=lr_scheduler_factory(cfg, plan.total_steps))
    if dist.world_size == 1 and ds_config["zero_optimization"]["stage"] == 0:
        # Averaging gradients over one rank changes nothing, but the stage-0 engine would still
        # flatten, all-reduce and copy back every gradient each step. (ZeRO-1..3 finalise their
        # gradient buffers in that call, so they keep it.)
        engine.enable_backward_allreduce = False
    skip_nonfinite_steps(engine)
    if cfg.compile:
        engine.compile()

    ema = ShardedEMA(engine, cfg.ema_decay, cfg.ema_update_after_step) if cfg.use_ema else None
    global_step, start_epoch, consumed_in_epoch = 0, 0, 0
    if resume_from is not None:
        load_started = time.perf_counter()
        meta = checkpoint.load(engine, cfg, dist, resume_from, ema)
        load_s = time.perf_counter() - load_started
        global_step, start_epoch, consumed_in_epoch = meta["global_step"], meta["epoch"], meta["samples_in_epoch"]
    else:
        seed_everything(cfg.seed + dist.rank)  # per-rank noise and timesteps from here on

    logger = RunLogger(cfg, is_main=dist.is_main, total_steps=plan.total_steps, initial_step=global_step, monitor=engine.monitor)
    if resume_from is not None:
        changed = f"; changed since: {', '.join(meta['changed_keys'])}" if meta["changed_keys"] else ""
        logger.message(f"resumed from {resume_from} at step {global_step} in {load_s:.1f} s{changed}")
    if fused_adam_problem is not None and "fused" in ds_config["optimizer"]["params"]:
        logger.message(f"optimizer: torch.optim.AdamW(fused=True) instead of DeepSpeed's fused Adam ({fused_adam_problem}; "
                       "prebuild it with DS_BUILD_FUSED_ADAM=1 pip install deepspeed)")
    if missing_images:
        logger.message(f"skipping {len(missing_images)} row(s) whose image file is missing (skip_bad_images), first: row {missing_images[0]}")
    logger.message(f"training {num_trainable:,} parameters "
                   f"({'LoRA' if cfg.use_lora.action else 'full UNet'}), {zero_description(cfg, ds_config, loaded_partitioned)}, "
                   f"{cfg.weight_dtype_name}, {dist.world_size} process(es), {plan.total_steps} steps; "
                   f"{kernel_description(cfg, engine.module, accelerator_name, tf32)}, {num_workers} loader worker(s)")
    compute_dtype = DTYPES[cfg.weight_dtype_name]
    samples_per_step = cfg.train_micro_batch_size_per_gpu * cfg.gradient_accumulation_steps * dist.world_size
    samples_per_micro_batch = cfg.train_micro_batch_size_per_gpu * dist.world_size
    # channels_last: NHWC latents make cuDNN (and oneDNN) pick NHWC convolution kernels, which follow
    # the input's format. The weights stay contiguous: DeepSpeed's parameter broadcast views them as
    # bytes and ZeRO/bf16 re-point them into flat buffers, both of which need the default layout.
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def unet_forward(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        return engine(noisy_latents.contiguous(memory_format=memory_format), timesteps, encoder_hidden_states,
                      added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]

    def save(epoch: int) -> None:
        started = time.perf_counter()
        check_weights_before_writing(engine, dist.device, "checkpoint", global_step)
        saved = checkpoint.save(engine, cfg, dist, global_step, {"epoch": epoch, "samples_in_epoch": consumed_in_epoch}, ema)
        logger.message(f"checkpoint saved: {saved} (step {global_step}, {time.perf_counter() - started:.1f} s)")

    window = StepWindow(dist.device, cfg.log_every_n_steps)
    first_step = global_step + 1
    validated_at = saved_at = -1
    epoch = start_epoch
    window_started = time.perf_counter()
    for epoch, batch in epoch_batches(loader, sampler, dataset, start_epoch, plan.num_epochs, consumed_in_epoch // dist.world_size):
        if global_step >= plan.total_steps:
            break
        if batch is None:  # end of an epoch
            consumed_in_epoch = 0
            if cfg.validation_epochs and (epoch + 1) % cfg.validation_epochs == 0 and validated_at != global_step:
                run_validation(cfg, dist, frozen, engine, global_step, logger, ema)
                validated_at = global_step
            continue
        # Set before the forward: ZeRO reduces gradients in the backward of a window's last micro-batch.
        # A window ends every gradient_accumulation_steps micro-batches and at the end of an epoch
        # (a partial window steps, as with accelerate); everything below the `continue` happens once
        # per optimizer step.
        engine.set_gradient_accumulation_boundary(plan.ends_window(consumed_in_epoch // samples_per_micro_batch))
        encoded = encode_batch(frozen, to_device(batch, dist.device))
        loss = diffusion_loss(unet_forward, frozen, encoded.latents, encoded.encoder_hidden_states, compute_dtype=compute_dtype,
                              noise_offset=cfg.noise_offset, snr_gamma=cfg.snr_gamma, input_perturbation=cfg.input_perturbation,
                              added_cond_kwargs=encoded.added_cond_kwargs)
        window.add_micro_batch(loss)  # before backward, which may scale the loss (accumulation, fp16)
        engine.backward(loss)
        at_boundary = engine.is_gradient_accumulation_boundary()
        engine.step()  # skips (and counts in engine.skipped_steps) an update with nan/inf gradients
        consumed_in_epoch += samples_per_micro_batch
        if not at_boundary:
            continue
        global_step += 1
        window.end_optimizer_step()
        logger.advance()
        last = global_step >= plan.total_steps
        save_due = bool(cfg.save_interval) and global_step % cfg.save_interval == 0 and not last
        stop = False
        if save_due or last or global_step == first_step or global_step % cfg.log_every_n_steps == 0:
            stats = window.sync(preemption.signalled(global_step, dist.rank))  # the interval's one collective
            now = time.perf_counter()
            lr = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else engine.get_lr()[0]
            logger.log_step(global_step, {"loss": stats.mean_loss, "lr": lr,
                                          "samples_per_s": samples_per_step * stats.steps / (now - window_started),
                                          "epoch": epoch, "skipped_steps": float(engine.skipped_steps),
                                          "nonfinite_losses": float(stats.nonfinite_losses)})
            window_started = now
            if stats.longest_nonfinite_run >= cfg.max_nonfinite_steps:
                raise TrainingError(nonfinite_stop_message(stats.longest_nonfinite_run, global_step, epoch, cfg.use_fp16.enabled))
            stop = stats.stop_requested and not last
        if ema is not None:  # before validation, which may show the EMA of this step
            ema.update(global_step)
        if cfg.validation_steps and global_step % cfg.validation_steps == 0:
            run_validation(cfg, dist, frozen, engine, global_step, logger, ema)
            validated_at = global_step
        if save_due or stop:  # once, also when a save step is the stop step
            save(epoch)
            saved_at = global_step
        if stop:
            logger.message(f"stopped by {preemption.signal_names()} at step {global_step}; checkpoint saved in "
                           f"{cfg.checkpoint_dir}; start again with resume_from_checkpoint=latest to continue")
            logger.close()
            raise Preempted(global_step)
        if last:
            break

    if (cfg.validation_steps or cfg.validation_epochs) and validated_at != global_step:
        run_validation(cfg, dist, frozen, engine, global_step, logger, ema)
    if saved_at != global_step:
        save(epoch)
    export_started = time.perf_counter()
    check_weights_before_writing(engine, dist.device, "export", global_step)
    exported = export_model(engine, is_lora=cfg.use_lora.action, base_dir=cfg.pretrained_model_name_or_path,
                            out_dir=cfg.output_dir, rank=dist.rank, export_dtype=cfg.export_dtype, vae_dir=cfg.vae_path,
                            variant=cfg.variant)
    if ema is not None:
        export_model(engine, is_lora=False, base_dir=cfg.pretrained_model_name_or_path, out_dir=cfg.output_dir,
                     rank=dist.rank, export_dtype=cfg.export_dtype, subfolder="unet_ema", replacements=ema.gathered(dist.rank),
                     vae_dir=cfg.vae_path, variant=cfg.variant)
    barrier()
    logger.message(f"export written in {time.perf_counter() - export_started:.1f} s")
    if dataset.bad_rows():
        logger.message(f"skipped {len(dataset.bad_rows())} unreadable or missing image row(s) on rank 0 (skip_bad_images): {dataset.bad_rows()[:20]}")
    logger.message(f"done: {global_step} steps; weights in {exported}" if exported else f"done: {global_step} steps")
    logger.close()
    return exported


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_cfg_args(argv, prog="python -m ds_diffusers.train", description=__doc__.splitlines()[0],
                          cfg_help="JSON config file (see cfg/ and README.md)",
                          set_example="use_lora.rank=8 seed=1 (dotted for nested keys)")


def main(argv: list[str] | None = None) -> int:
    preemption.install()  # first: a scheduler's warning signal may come while models still load
    args = parse_args(argv)
    quiet_known_notices()
    together = False  # every rank leaves train() at the same point: tearing the group down is safe
    try:
        cfg = resolve_hub_ids(load_config(args.cfg, args.overrides))
        check_environment(cfg)
        train(cfg)
        together = True
        return 0
    except ConfigError as err:
        print(f"ds-diffusers: config error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"ds-diffusers: training stopped: {err}", file=sys.stderr)
        return 3
    except Preempted:
        together = True
        return preemption.EXIT_PREEMPTED
    finally:
        lock.release_all()
        # Not after other errors: one rank may have failed alone, and its peers, waiting in a
        # collective, would never reach the teardown's barrier (the launcher ends them instead).
        if together:
            shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
