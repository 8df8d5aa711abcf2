"""Sampling entrypoint: `python -m ds_diffusers.sample --cfg PATH [--set key.sub=value ...]`, also
started as `deepspeed [--num_gpus N] --module ds_diffusers.sample --cfg PATH` or under srun.

Reads the training cfg file (same validation) and its `sample` block, then draws every prompt's
images with each requested weight (baseline, tuned, ema, lora), prompts split across ranks, and
writes PNGs, a comparison grid and manifest.json to `sample.output_dir`.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ds_diffusers.config import Config, load_config, parse_cfg_args
from ds_diffusers.config.checks import check_model_dir, check_writable_folder
from ds_diffusers.config.hub import resolve_hub_ids
from ds_diffusers.devices import check_accelerator_expected
from ds_diffusers.distributed import DistInfo, barrier, init_distributed, shutdown_distributed
from ds_diffusers.errors import ConfigError
from ds_diffusers.families import detect_family
from ds_diffusers.models import DTYPES, load_frozen_components
from ds_diffusers.sampling.generate import generate_prompt_images
from ds_diffusers.sampling.outputs import check_complete, gather_records, write_grid, write_image, write_manifest
from ds_diffusers.sampling.pipeline import weight_pipeline
from ds_diffusers.sampling.plan import SamplePlan, check_against_model
from ds_diffusers.sampling.weights import WeightSource, resolve_weights
from ds_diffusers.quiet import quiet_known_notices


def sampling_dtype(cfg: Config) -> torch.dtype:
    """The training weight dtype where the accelerator has it; float32 otherwise (e.g. a cfg trained
    in fp16 on GPUs, sampled on a CPU): inference only gains precision from it."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    name = cfg.weight_dtype_name
    if (name == "float16" and not accelerator.is_fp16_supported()) or (name == "bfloat16" and not accelerator.is_bf16_supported()):
        return torch.float32
    return DTYPES[name]


def prepare(cfg: Config) -> tuple[SamplePlan, list[WeightSource]]:
    """Every check that can fail on user input, before any process group or model exists."""
    plan = SamplePlan.from_config(cfg)
    check_accelerator_expected()
    check_model_dir(cfg.pretrained_model_name_or_path, cfg.variant)
    check_against_model(plan, cfg.pretrained_model_name_or_path)
    sources = resolve_weights(cfg, plan)
    check_writable_folder(plan.output_dir, "sample.output_dir")
    return plan, sources


def sample(cfg: Config, plan: SamplePlan, sources: list[WeightSource], run_info: dict[str, Any]) -> Path | None:
    """All ranks. Returns the manifest path on rank 0."""
    started = time.perf_counter()
    dist: DistInfo = init_distributed()
    dtype = sampling_dtype(cfg)
    my_prompts = plan.prompt_indices(dist.rank, dist.world_size)
    # A flow family samples with its own sampler (sampling/pipeline.py), whatever sample.scheduler says.
    sampler = "flow-matching Euler" if detect_family(cfg.pretrained_model_name_or_path).objective == "flow" else plan.scheduler
    if dist.is_main:
        print(f"ds-diffusers: sampling {len(plan.prompts)} prompt(s) x {plan.num_images_per_prompt} image(s) x "
              f"{', '.join(plan.weights)} ({sampler}, {plan.num_inference_steps} steps, {plan.resolution} px, "
              f"{str(dtype).removeprefix('torch.')}) on {dist.world_size} process(es) -> {plan.output_dir}", flush=True)
    frozen = load_frozen_components(cfg.pretrained_model_name_or_path, dist.device, dtype, cfg.prediction_type, cfg.vae_path,
                                    cfg.variant)
    records = []
    for source in sources:
        with weight_pipeline(source, frozen, plan, dist.device, dtype) as pipe:
            for prompt_index in my_prompts:
                images = generate_prompt_images(pipe, plan, prompt_index)
                records += [write_image(image, plan, source.name, prompt_index, image_index, dist.rank)
                            for image_index, image in enumerate(images)]
    records = gather_records(records)
    check_complete(records, plan)  # on every rank, so all stop together if sharding went wrong
    barrier()  # every rank's PNGs are on disk before rank 0 reads them back
    manifest = None
    if dist.is_main:
        grid = write_grid(records, plan)
        seconds = time.perf_counter() - started
        manifest = write_manifest(plan, sources, records, {
            **run_info, "world_size": dist.world_size, "device": str(dist.device), "dtype": str(dtype).removeprefix("torch."),
            "seconds": round(seconds, 2), "versions": _versions(),
        })
        print(f"ds-diffusers: wrote {len(records)} images in {seconds:.1f} s; grid {grid}; manifest {manifest}", flush=True)
    shutdown_distributed()
    return manifest


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_cfg_args(argv, prog="python -m ds_diffusers.sample", description=__doc__.splitlines()[0],
                          cfg_help="the training JSON config file (see cfg/ and README.md)",
                          set_example="sample.weights='[\"baseline\",\"lora\"]' sample.lora_scale=0.5")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_known_notices()
    try:
        cfg = resolve_hub_ids(load_config(args.cfg, args.overrides))
        plan, sources = prepare(cfg)
        sample(cfg, plan, sources, {"cfg": str(args.cfg), "overrides": list(args.overrides)})
    except ConfigError as err:
        print(f"ds-diffusers: config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
