"""A text-to-image pipeline for one weight source: the shared frozen components, that source's UNet
or transformer (plus its LoRA adapters) and the chosen sampler. One denoiser is in memory at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from ds_diffusers.families import family_named
from ds_diffusers.generation import build_pipeline
from ds_diffusers.models import FrozenComponents
from ds_diffusers.sampling.plan import SamplePlan
from ds_diffusers.sampling.schedulers import make_scheduler
from ds_diffusers.sampling.weights import WeightSource


def load_unet(unet_dir: str, device: torch.device, dtype: torch.dtype, variant: str | None = None) -> UNet2DConditionModel:
    """The denoiser in `unet_dir`, of the diffusers class its config names (a UNet, FLUX.1's transformer)."""
    import diffusers

    model_class = getattr(diffusers, UNet2DConditionModel.load_config(unet_dir).get("_class_name", "UNet2DConditionModel"))
    unet = model_class.from_pretrained(unet_dir, torch_dtype=dtype, variant=variant)
    unet.requires_grad_(False)
    return unet.eval().to(device)


@contextlib.contextmanager
def weight_pipeline(source: WeightSource, frozen: FrozenComponents, plan: SamplePlan, device: torch.device,
                    dtype: torch.dtype) -> Iterator[DiffusionPipeline]:
    pipe = build_pipeline(frozen, load_unet(source.unet_dir, device, dtype, source.variant))
    family = family_named(frozen.family)
    # A flow family samples with its own (flow-matching) sampler; sample.scheduler names ε/v samplers.
    pipe.scheduler = (family.sampling_scheduler(frozen.noise_scheduler.config) if family.objective == "flow"
                      else make_scheduler(plan.scheduler, frozen.noise_scheduler.config))
    names = [f"lora_{index}" for index in range(len(source.loras))]
    try:
        for name, lora in zip(names, source.loras):
            path = Path(lora.path)
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        if names:
            pipe.set_adapters(names, adapter_weights=[lora.weight for lora in source.loras])
        yield pipe
    finally:
        if names:
            # A LoRA file may also patch the text encoder, which every weight shares.
            pipe.unload_lora_weights()
