"""Training entrypoint: `python -m ds_diffusers.train --cfg PATH [--set key.sub=value ...]`, also
started as `deepspeed [--num_gpus N] --module ds_diffusers.train --cfg PATH`.

This is the one file that knows the order of the steps:
config -> models -> data -> DeepSpeed engine -> (resume) -> loop -> checkpoint -> export.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ds_diffusers import lock, preemption, validation
from ds_diffusers.cadence import LogCadence, ValidationCadence
from ds_diffusers.checkpoint_reader import read_meta
from ds_diffusers.checkpoint_manager import CheckpointManager, clear_previous_run, resume_or_fresh_start
from ds_diffusers.config import Config, check_environment, load_config, parse_cfg_args, to_deepspeed_config
from ds_diffusers.config.checks import fused_adam_unavailable
from ds_diffusers.config.hub import resolve_hub_ids
from ds_diffusers.config.schedules import lr_scheduler_factory
from ds_diffusers.config.show import add_print_options, print_deepspeed_config
from ds_diffusers.data import to_device
from ds_diffusers.data.text_prepass import TextCache, prepare_text
from ds_diffusers.data.train_input import build_input, check_input
from ds_diffusers.distributed import (DistInfo, StoppedOnEveryRank, barrier, broadcast_from_main, in_turn, init_distributed,
                                      raise_on_every_rank, shutdown_distributed)
from ds_diffusers.ema import ShardedEMA
from ds_diffusers.engine import (StartingValues, full_numel, is_zero3_param, mmap_checkpoint_reads, skip_nonfinite_steps,
                                 skip_single_rank_allreduce, unet_weight_files)
from ds_diffusers.errors import ConfigError, TrainingError
from ds_diffusers.export import export_model
from ds_diffusers.families import family_named
from ds_diffusers.flow_matching import FlowObjective, flow_matching_loss, flow_objective
from ds_diffusers.metrics import RunLogger
from ds_diffusers.models import (DTYPES, FrozenComponents, attention_description, build_unet, cast_trainable_like_partitioned,
                                 load_frozen_components, param_groups, set_tf32)
from ds_diffusers.nonfinite import check_weights_before_writing, master_weights_largest, nonfinite_stop_message
from ds_diffusers.objective import diffusion_loss, encode_batch
from ds_diffusers.quiet import quiet_known_notices
from ds_diffusers.run_plan import RunPlan, epoch_batches
from ds_diffusers.step_window import StepWindow, WindowStats
from ds_diffusers.topology import rebatched, requested_batch
from ds_diffusers.train_state import TrainState, fresh_rng_state
from ds_diffusers.validation_loss import HeldOutLoss


class Preempted(Exception):
    """The run saved a checkpoint and stopped on a signal; it is meant to be started again."""


def zero_description(cfg: Config, ds_config: dict, loaded_partitioned: bool = False, denoiser: str = "unet") -> str:
    engine_stage = ds_config["zero_optimization"]["stage"]
    if engine_stage == 3:
        # Users compare the peak memory per rank with DeepSpeed's estimate; say which load ran.
        return f"ZeRO-3 ({denoiser} " + ("loaded partitioned)" if loaded_partitioned else "loaded whole on every rank, then partitioned)")
    if engine_stage == cfg.zero_optimization.stage:
        return f"ZeRO-{engine_stage}"
    if cfg.zero_optimization.stage == 0:
        reason = "16-bit weights need a ZeRO optimizer for loss scaling and fp32 masters"
    else:
        reason = "one process has nothing to partition"
    return f"ZeRO-{cfg.zero_optimization.stage} (run as ZeRO-{engine_stage}: {reason})"


def kernel_description(cfg: Config, unet: torch.nn.Module, accelerator_name: str, tf32: bool) -> str:
    options = [name for name, on in (("TF32", tf32 and accelerator_name == "cuda"), ("channels_last", cfg.channels_last),
                                     ("compiled", cfg.compile)) if on]
    return ", ".join([attention_description(unet, accelerator_name), *options])


def seed_everything(seed: int) -> None:
    fresh_rng_state(seed)


@dataclass
class Run:
    """The parts of a run that `set_up` builds for the loop."""

    cfg: Config
    dist: DistInfo
    plan: RunPlan
    frozen: FrozenComponents
    engine: Any
    lr_scheduler: Any
    ema: ShardedEMA | None
    loader: Any
    sampler: Any
    dataset: Any
    state: TrainState
    checkpoints: CheckpointManager
    logger: RunLogger
    held_out_loss: HeldOutLoss | None = None
    prompts: TextCache | None = None  # validation prompts' embeddings when the text encoders were freed
    flow: FlowObjective | None = None  # a flow family's training scheduler and density (None: ε / v)


def set_up(cfg: Config) -> Run:
    """All ranks: the process group, every check of the input (on rank 0; a refusal stops every rank),
    then models, data, engine, resume (or a fresh start's per-rank seeds) and the logger."""
    lock.check_not_locked(cfg)  # two stats; before the group, so a busy folder costs no start-up
    dist = init_distributed()
    # Rank 0 checks the data (data/prepare.py), then the checkpoint to resume from; nothing is written before.
    checked = check_input(cfg, dist)
    resume_from = broadcast_from_main(in_turn(lambda: resume_or_fresh_start(cfg, dist.world_size), dist.is_main))
    requested, batch_line = requested_batch(cfg), None
    if resume_from is not None:  # on another process count: the checkpoint's global batch is kept
        cfg, batch_line = rebatched(cfg, read_meta(resume_from), dist.world_size, resume_from)
    # The folders are created here, with their locks, once every check of the input has passed.
    raise_on_every_rank(lock.lock_run_folders(cfg) if dist.is_main else None)
    if resume_from is None and dist.is_main:
        clear_previous_run(cfg)
    barrier()

    from deepspeed.accelerator import get_accelerator

    accelerator_name = get_accelerator().device_name()
    set_tf32(tf32 := cfg.allow_tf32 if cfg.allow_tf32 is not None else accelerator_name == "cuda")
    seed_everything(cfg.seed)  # same on every rank while the models (and LoRA init) are built
    frozen = load_frozen_components(cfg.pretrained_model_name_or_path, dist.device, weight_dtype := DTYPES[cfg.weight_dtype_name],
                                    cfg.prediction_type, cfg.vae_path, cfg.variant, with_text_encoders=False)
    with torch.random.fork_rng(devices=[]):  # the same RNG whether the encoders load or not
        text = prepare_text(cfg, checked.text_sources, frozen, dist)
    family = family_named(frozen.family)
    fused_adam_problem = fused_adam_unavailable(get_accelerator()) if accelerator_name != "cpu" else None
    ds_config = to_deepspeed_config(cfg, world_size=dist.world_size, accelerator_name=accelerator_name,
                                    fused_adam_ok=fused_adam_problem is None)
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    unet = build_unet(cfg, ds_config if zero3 else None, dist.rank)
    loaded_partitioned = is_zero3_param(next(unet.parameters()))
    # 16-bit: the optimizer's fp32 masters start from the checkpoint's values, not rounded ones.
    starting_values = None
    if weight_dtype != torch.float32 and resume_from is None:
        unet_files = (unet_weight_files(cfg.pretrained_model_name_or_path, cfg.variant, family.denoiser_folder)
                      if loaded_partitioned else None)
        starting_values = StartingValues.capture(unet, unet_files)
    cast_trainable_like_partitioned(unet, weight_dtype)
    groups = param_groups(unet, cfg)
    num_trainable = sum(full_numel(p) for group in groups for p in group["params"])

    data = build_input(checked, cfg, frozen, dist, pin_memory=accelerator_name != "cpu", text_cache=text.text_cache)
    plan = RunPlan.from_config(cfg, data.num_rows, dist.world_size, data.batches_per_epoch)
    held_out_loss = None
    if checked.rows is not None and checked.rows.held_out is not None:
        checks = checked.rows.checks
        held_out_loss = HeldOutLoss(checked.rows.held_out, checks.image_column, checks.caption_column, frozen, dist,
                                    resolution=cfg.resolution, seed=cfg.seed, num_timesteps=cfg.validation_loss_timesteps,
                                    text_cache=text.prompt_cache)

    engine, lr_scheduler = build_engine(cfg, dist, unet, groups, ds_config, plan.total_steps, starting_values)
    ema = ShardedEMA(engine, cfg.ema_decay, cfg.ema_update_after_step) if cfg.use_ema else None
    state = TrainState(data_order=data.data_order)
    checkpoints = CheckpointManager(cfg, dist, {"engine": engine, "train_state": state, "ema": ema}, plan.total_steps,
                                    requested)
    resumed = checkpoints.load(resume_from) if resume_from is not None else None
    if resumed is None:
        seed_everything(cfg.seed + dist.rank)  # per-rank noise and timesteps from here on

    logger = RunLogger(cfg, is_main=dist.is_main, total_steps=plan.total_steps, initial_step=state.global_step, monitor=engine.monitor)
    logger.message(text.line)
    if resumed is not None:
        logger.message(resumed.message())
    if batch_line is not None:
        logger.message(batch_line)
    if fused_adam_problem is not None and "fused" in ds_config["optimizer"]["params"]:
        logger.message(f"optimizer: torch.optim.AdamW(fused=True) instead of DeepSpeed's fused Adam ({fused_adam_problem}; "
                       "prebuild it with DS_BUILD_FUSED_ADAM=1 pip install deepspeed)")
    if data.buckets is not None:
        logger.message(data.buckets.histogram())
    if held_out_loss is not None:
        logger.message(held_out_loss.description())
    if checked.missing_images:
        logger.message(f"skipping {len(checked.missing_images)} row(s) whose image file is missing (skip_bad_images), "
                       f"first: row {checked.missing_images[0]}")
    logger.message(f"training {num_trainable:,} parameters "
                   f"({'LoRA' if cfg.use_lora.action else 'full ' + family.denoiser_folder}), "
                   f"{zero_description(cfg, ds_config, loaded_partitioned, family.denoiser_folder)}, "
                   f"{cfg.weight_dtype_name}, {dist.world_size} process(es), {plan.total_steps} steps; "
                   f"{kernel_description(cfg, engine.module, accelerator_name, tf32)}, {data.num_workers} loader worker(s)")
    flow = flow_objective(cfg, family, frozen.noise_scheduler.config) if family.objective == "flow" else None
    return Run(cfg=cfg, dist=dist, plan=plan, frozen=frozen, engine=engine, lr_scheduler=lr_scheduler, ema=ema, loader=data.loader,
               sampler=data.sampler, dataset=data.dataset, state=state, checkpoints=checkpoints, logger=logger,
               held_out_loss=held_out_loss, prompts=text.prompt_cache, flow=flow)


def build_engine(cfg: Config, dist: DistInfo, unet: torch.nn.Module, groups: list[dict], ds_config: dict,
                 total_steps: int, starting_values: StartingValues | None) -> tuple[Any, Any]:
    """All ranks: the DeepSpeed engine around the UNet, and its lr scheduler. `starting_values`
    (16-bit fresh starts): the fp32 values the masters are set to before anything reads them."""
    import deepspeed

    if dist.is_main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    engine, _, _, lr_scheduler = deepspeed.initialize(model=unet, model_parameters=groups, config=ds_config,
                                                      lr_scheduler=lr_scheduler_factory(cfg, total_steps))
    if starting_values is not None:
        starting_values.write_into(engine)
    skip_single_rank_allreduce(engine, dist.world_size, ds_config["zero_optimization"]["stage"])
    skip_nonfinite_steps(engine)
    mmap_checkpoint_reads(engine)
    if cfg.compile:
        engine.compile()
    return engine, lr_scheduler


def train(cfg: Config) -> Path | None:
    run = set_up(cfg)
    run_loop(run)
    return finish(run)


def run_loop(run: Run) -> None:
    """All ranks: optimizer steps from the train state's position to the end of the plan, with the log
    points, validation images and checkpoints their cadences ask for; raises Preempted after the save
    a stop signal asks for."""
    cfg, dist, engine, state, plan, logger = run.cfg, run.dist, run.engine, run.state, run.plan, run.logger
    validation = ValidationCadence(cfg.validation_steps, cfg.validation_epochs)
    log_points = LogCadence(cfg.log_every_n_steps, first_step=state.global_step + 1, last_step=plan.total_steps,
                            also_at=run.checkpoints.should_save)
    window = StepWindow(dist.device, cfg.log_every_n_steps)
    samples_per_micro_batch = cfg.train_micro_batch_size_per_gpu * dist.world_size
    window_started = time.perf_counter()
    for epoch, batch in epoch_batches(run.loader, run.sampler, run.dataset, state.epoch, plan.num_epochs,
                                      state.samples_in_epoch):
        state.epoch = epoch
        if state.global_step >= plan.total_steps:
            break
        if batch is None:  # end of an epoch
            state.samples_in_epoch = 0
            if validation.should_run_at_epoch_end(epoch, state.global_step):
                validate(run, validation)
            continue
        # Set before the forward: ZeRO reduces gradients in the backward of a window's last micro-batch.
        # A window ends every gradient_accumulation_steps micro-batches and at the end of an epoch
        # (a partial window steps, as with accelerate); everything below the `continue` happens once
        # per optimizer step.
        engine.set_gradient_accumulation_boundary(plan.ends_window(state.samples_in_epoch // samples_per_micro_batch))
        loss = micro_batch_loss(run, batch)
        window.add_micro_batch(loss)  # before backward, which may scale the loss (accumulation, fp16)
        engine.backward(loss)
        at_boundary = engine.is_gradient_accumulation_boundary()
        engine.step()  # skips (and counts in engine.skipped_steps) an update with nan/inf gradients
        state.samples_in_epoch += samples_per_micro_batch
        if not at_boundary:
            continue
        state.global_step += 1
        window.end_optimizer_step()
        logger.advance()
        last = state.global_step >= plan.total_steps
        stop = False
        if log_points.should_run(state.global_step):
            stats = window.sync(preemption.signalled(state.global_step, dist.rank))  # the interval's one collective
            window_started = log_point(run, stats, window_started)
            stop = stats.stop_requested and not last
        if run.ema is not None:  # before validation, which may show the EMA of this step
            run.ema.update(state.global_step)
        if validation.should_run(state.global_step):
            validate(run, validation)
        run.checkpoints.after_step(logger, stop=stop)
        if stop:
            logger.close()
            raise Preempted(state.global_step)
        if last:
            break
    if validation.should_run_at_end(state.global_step):
        validate(run, validation)
    run.checkpoints.at_end(logger)


def unet_forward_of(run: Run):
    """The engine's forward as the objective calls it."""
    # channels_last: NHWC latents make cuDNN (and oneDNN) pick NHWC convolution kernels, which follow
    # the input's format. The weights stay contiguous: DeepSpeed's parameter broadcast views them as
    # bytes and ZeRO/bf16 re-point them into flat buffers, both of which need the default layout.
    memory_format = torch.channels_last if run.cfg.channels_last else torch.contiguous_format

    def unet_forward(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        return run.engine(noisy_latents.contiguous(memory_format=memory_format), timesteps, encoder_hidden_states,
                          added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]

    return unet_forward


def denoiser_call_of(run: Run):
    """The engine as the objective calls it: `unet_forward_of`, or the family's `flow_forward` bound to it."""
    if run.flow is None:
        return unet_forward_of(run)
    return partial(family_named(run.frozen.family).flow_forward, run.engine, run.engine.module.config)


def micro_batch_loss(run: Run, batch: dict[str, Any]) -> torch.Tensor:
    cfg = run.cfg
    encoded = encode_batch(run.frozen, to_device(batch, run.dist.device))
    if run.flow is not None:
        denoiser_forward = denoiser_call_of(run)(encoded.encoder_hidden_states, encoded.added_cond_kwargs)
        return flow_matching_loss(denoiser_forward, run.flow.scheduler, encoded.latents, run.flow.settings,
                                  compute_dtype=DTYPES[cfg.weight_dtype_name])
    return diffusion_loss(unet_forward_of(run), run.frozen, encoded.latents, encoded.encoder_hidden_states,
                          compute_dtype=DTYPES[cfg.weight_dtype_name], noise_offset=cfg.noise_offset, snr_gamma=cfg.snr_gamma,
                          input_perturbation=cfg.input_perturbation, added_cond_kwargs=encoded.added_cond_kwargs)


def log_point(run: Run, stats: WindowStats, window_started: float) -> float:
    """The numbers all ranks agreed on go to the logger; every rank stops on too long a run of
    non-finite losses. Returns the start of the next interval."""
    cfg, state, engine = run.cfg, run.state, run.engine
    now = time.perf_counter()
    lr = run.lr_scheduler.get_last_lr()[0] if run.lr_scheduler is not None else engine.get_lr()[0]
    samples_per_step = cfg.train_micro_batch_size_per_gpu * cfg.gradient_accumulation_steps * run.dist.world_size
    run.logger.log_step(state.global_step, {"loss": stats.mean_loss, "lr": lr,
                                            "samples_per_s": samples_per_step * stats.steps / (now - window_started),
                                            "epoch": state.epoch, "skipped_steps": float(engine.skipped_steps),
                                            "nonfinite_losses": float(stats.nonfinite_losses)})
    if stats.longest_nonfinite_run >= cfg.max_nonfinite_steps:
        largest_weight = master_weights_largest(engine, run.dist.device)  # all ranks: they agreed on stats
        raise TrainingError(nonfinite_stop_message(stats.longest_nonfinite_run, state.global_step, state.epoch,
                                                   cfg.use_fp16.enabled, largest_weight))
    return now


def validate(run: Run, cadence: ValidationCadence) -> None:
    held_out_loss = None
    if run.held_out_loss is not None:
        compute_dtype = DTYPES[run.cfg.weight_dtype_name]
        held_out_loss = lambda: run.held_out_loss(denoiser_call_of(run), compute_dtype)  # noqa: E731
    validation.run_validation(run.cfg, run.dist, run.frozen, run.engine, run.state.global_step, run.logger, run.ema,
                              held_out_loss, run.prompts)
    cadence.ran(run.state.global_step)


def finish(run: Run) -> Path | None:
    """All ranks: the export of the trained (and EMA) weights, and the closing lines."""
    cfg, dist, logger, global_step = run.cfg, run.dist, run.logger, run.state.global_step
    export_started = time.perf_counter()
    check_weights_before_writing(run.engine, dist.device, "export", global_step)
    exported = export_model(run.engine, is_lora=cfg.use_lora.action, base_dir=cfg.pretrained_model_name_or_path,
                            out_dir=cfg.output_dir, rank=dist.rank, export_dtype=cfg.export_dtype, vae_dir=cfg.vae_path,
                            variant=cfg.variant, ema_weights=run.ema.gathered(dist.rank) if run.ema is not None else None)
    barrier()
    logger.message(f"export written in {time.perf_counter() - export_started:.1f} s")
    bad_rows = run.dataset.bad_rows()
    if bad_rows:
        logger.message(f"skipped {len(bad_rows)} unreadable or missing image row(s) on rank 0 (skip_bad_images): {bad_rows[:20]}")
    logger.message(f"done: {global_step} steps; weights in {exported}" if exported else f"done: {global_step} steps")
    logger.close()
    return exported


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_cfg_args(argv, prog="python -m ds_diffusers.train", description=__doc__.splitlines()[0],
                          cfg_help="JSON config file (see cfg/ and README.md)",
                          set_example="use_lora.rank=8 seed=1 (dotted for nested keys)", add_arguments=add_print_options)


def main(argv: list[str] | None = None) -> int:
    preemption.install()  # first: a scheduler's warning signal may come while models still load
    args = parse_args(argv)
    if args.print_deepspeed_config:
        return print_deepspeed_config(args.cfg, args.overrides, args.world_size, args.accelerator)
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
        together = isinstance(err, StoppedOnEveryRank)
        return 2
    except TrainingError as err:
        print(f"ds-diffusers: training stopped: {err}", file=sys.stderr)
        return 3
    except Preempted:
        together = True
        return preemption.exit_code()
    except KeyboardInterrupt:  # a second Ctrl-C; a save it cut short removed its partial folder
        print("ds-diffusers: interrupted by a second Ctrl-C before the stop's checkpoint (a save in progress was abandoned and "
              "its folder removed); start again with resume_from_checkpoint=latest to continue from the last complete one",
              file=sys.stderr)
        return preemption.EXIT_INTERRUPTED
    finally:
        lock.release_all()
        # Not after other errors: one rank may have failed alone, and its peers, waiting in a
        # collective, would never reach the teardown's barrier (the launcher ends them instead).
        if together:
            shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
