"""Sampler names of `sample.scheduler` -> diffusers schedulers built from the model's own scheduler
config (so beta schedule, prediction type and timestep spacing match what the UNet was trained on)."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# One entry per name of `sample_schema.SchedulerName`.
# name -> (class, settings that override the model's scheduler config)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    # As the Stable Diffusion pipelines ship it: PLMS steps only, no Runge-Kutta warm-up.
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def make_scheduler(name: str, model_scheduler_config: Any) -> SchedulerMixin:
    scheduler_class, overrides = SCHEDULERS[name]
    return scheduler_class.from_config(model_scheduler_config, **overrides)
