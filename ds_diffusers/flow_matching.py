"""The flow-matching (rectified-flow) objective of Flux and SD 3.x, as diffusers' DreamBooth scripts
train them: a sigma drawn from the configured density over the scheduler's training sigmas, the
noisy input (1 − σ)·latents + σ·noise, the target noise − latents (SD 3.x: the latents, against
the preconditioned prediction x_σ − σ·v), and the configured per-sample loss weighting. The density and the weighting are diffusers' own (`training_utils`), and the sigma
table, with its shift, is `FlowMatchEulerDiscreteScheduler`'s.

Random draws (noise, then the density's draw, the scripts' order) use the process's global torch
RNG, as `objective.diffusion_loss` does. `fixed_sigma_loss` is the held-out validation loss's form
(validation_loss.py): fixed sigmas and noise, no weighting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

# diffusers' `--weighting_scheme` choices: logit_normal and mode shape the density of the sigmas
# (unit weights); sigma_sqrt and cosmap weight the loss (uniform density); none does neither.
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class FlowSettings:
    """The config's flow-matching keys, with the family's default scheme filled in."""

    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # The family's `precondition_outputs`: the loss compares x̂₀ = x_σ − σ·v with the latents.
    precondition_outputs: bool = False

    @classmethod
    def from_config(cls, cfg: Any, default_scheme: str, precondition_outputs: bool = False) -> "FlowSettings":
        scheme = cfg.weighting_scheme if cfg.weighting_scheme is not None else default_scheme
        return cls(scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, precondition_outputs)


@dataclass(frozen=True)
class FlowObjective:
    """What a flow family's run draws its sigmas from: the training scheduler and the density settings."""

    scheduler: FlowMatchEulerDiscreteScheduler
    settings: FlowSettings


def training_scheduler(scheduler_config: dict[str, Any], shift: float | None) -> FlowMatchEulerDiscreteScheduler:
    """The model's flow-matching scheduler, with `shift` (the `flow_shift` key) replacing its config's
    when given. Its `sigmas` are the training sigmas, shifted unless the config shifts dynamically
    (Flux: the shift then depends on the image size and applies at sampling only)."""
    overrides = {} if shift is None else {"shift": shift}
    return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config, **overrides)


def flow_objective(cfg: Any, family: Any, scheduler_config: dict[str, Any]) -> FlowObjective:
    """A flow family's run objective: its scheduler (with `flow_shift`), the config's density settings
    with the family's `default_weighting_scheme`, and the family's `precondition_outputs`."""
    return FlowObjective(training_scheduler(scheduler_config, cfg.flow_shift),
                         FlowSettings.from_config(cfg, family.default_weighting_scheme, family.precondition_outputs))


def sample_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, settings: FlowSettings, batch_size: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) [B] for one batch: u from the density, then the scheduler's entry at
    index ⌊u·N⌋, as the scripts pick them."""
    u = compute_density_for_timestep_sampling(weighting_scheme=settings.weighting_scheme, batch_size=batch_size,
                                              logit_mean=settings.logit_mean, logit_std=settings.logit_std,
                                              mode_scale=settings.mode_scale)
    num_train_timesteps = scheduler.config.num_train_timesteps
    # u is 1.0 at the edge of the mode density; the scripts would index one past the table.
    indices = (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
    return scheduler.timesteps[indices].to(device), scheduler.sigmas[indices].to(device)


def noisy_input_and_target(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rectified flow at σ (broadcast over each sample): the noisy input (1 − σ)·latents + σ·noise
    and the velocity target noise − latents; the training loss and the held-out loss both start here."""
    return (1.0 - sigmas) * latents + sigmas * noise, noise - latents


def flow_matching_loss(
    denoiser_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: FlowMatchEulerDiscreteScheduler,
    latents: torch.Tensor,
    settings: FlowSettings,
    *,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """Weighted mean-squared error of the denoiser's velocity, in fp32 whatever the compute dtype.
    `denoiser_forward(noisy_latents, timesteps)` closes over the family's conditioning; `timesteps`
    are the scheduler's (σ·N), which a family rescales if its denoiser expects σ. With
    `settings.precondition_outputs` (SD 3.x) the prediction becomes x_σ − σ·v and the target the
    latents, as diffusers' SD3 scripts compute them (the same minimum, weighted by σ² per sample)."""
    latents = latents.float()
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    timesteps, sigmas = sample_sigmas(scheduler, settings, latents.shape[0], latents.device)
    sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    noisy_latents, target = noisy_input_and_target(latents, noise, sigmas)
    model_pred = denoiser_forward(noisy_latents.to(compute_dtype), timesteps).float()
    if settings.precondition_outputs:
        model_pred = model_pred * (-sigmas) + noisy_latents
        target = latents
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=settings.weighting_scheme, sigmas=sigmas)
    per_sample = (weighting.float() * (model_pred - target) ** 2).reshape(latents.shape[0], -1).mean(dim=1)
    return per_sample.mean()


def fixed_sigmas(count: int) -> torch.Tensor:
    """`count` sigmas at the midpoints of even intervals of [0, 1], unshifted: 8 give 0.0625, 0.1875, ...,
    0.9375, the fixed sigmas torchtitan's Flux validator (`all_timesteps`), which MLPerf's Flux
    benchmark runs, evaluates every held-out sample at."""
    return (torch.arange(count, dtype=torch.float64) + 0.5).div(count).float()


def fixed_sigma_loss(
    denoiser_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    num_train_timesteps: int,
    *,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """The held-out form of the flow loss: the plain mean-squared error of the velocity against noise −
    latents at the given sigmas [B] and noise, in fp32. Unweighted, whatever `weighting_scheme` (and
    without SD 3.x's preconditioning, itself a σ² weight), so runs with other schemes compare. The
    denoiser gets σ·N as its timesteps, as `flow_matching_loss` passes the scheduler's."""
    latents = latents.float()
    sigmas = sigmas.to(latents.device, latents.dtype)
    noisy_latents, target = noisy_input_and_target(latents, noise.float(), sigmas.view(-1, *([1] * (latents.ndim - 1))))
    prediction = denoiser_forward(noisy_latents.to(compute_dtype), sigmas * num_train_timesteps).float()
    return ((prediction - target) ** 2).mean()
