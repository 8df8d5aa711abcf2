"""The denoising objective: batch -> latents, noise, timesteps -> UNet prediction -> fp32 loss.

Random draws (VAE posterior sample, noise, offset noise, timesteps) use the process's global torch
RNG, seeded per rank at start-up, so a run is reproducible and its RNG state can be checkpointed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr

from ds_diffusers.models import FrozenComponents


@torch.no_grad()
def encode_batch(frozen: FrozenComponents, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (scaled) and text-encoder hidden states, in the frozen models' dtype, from the
    encoders or from cached outputs. A cached posterior is sampled exactly as `latent_dist.sample()`
    would be, so cached and uncached runs draw the same random numbers."""
    vae, text_encoder = frozen.vae, frozen.text_encoder
    if "latent_parameters" in batch:
        posterior = DiagonalGaussianDistribution(batch["latent_parameters"].to(vae.device, vae.dtype))
    else:
        posterior = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist
    latents = posterior.sample() * frozen.latent_scaling_factor
    if "encoder_hidden_states" in batch:
        encoder_hidden_states = batch["encoder_hidden_states"].to(text_encoder.device, text_encoder.dtype)
    else:
        encoder_hidden_states = text_encoder(batch["input_ids"].to(text_encoder.device), return_dict=False)[0]
    return latents, encoder_hidden_states


def diffusion_loss(
    unet_forward: Callable[..., torch.Tensor],
    frozen: FrozenComponents,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    compute_dtype: torch.dtype,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    input_perturbation: float = 0.0,
) -> torch.Tensor:
    """Mean-squared error of the UNet's prediction, computed in fp32 whatever the compute dtype."""
    scheduler = frozen.noise_scheduler
    latents = latents.float()
    noise = torch.randn_like(latents)
    if noise_offset:
        # Offset noise (Guttenberg 2023): lets the model learn very dark/bright images.
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    # Input perturbation (Ning et al. 2023), as diffusers' script: the noised input uses perturbed
    # noise, the target stays the unperturbed one. Drawn in the script's order (before the timesteps).
    input_noise = noise + input_perturbation * torch.randn_like(latents) if input_perturbation else noise
    batch = latents.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=latents.device).long()
    noisy_latents = scheduler.add_noise(latents, input_noise, timesteps)

    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")

    model_pred = unet_forward(noisy_latents.to(compute_dtype), timesteps, encoder_hidden_states.to(compute_dtype))
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target, reduction="mean")
    # Min-SNR weighting (Hang et al. 2023), as in diffusers' reference recipe.
    snr = compute_snr(scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    per_sample = F.mse_loss(model_pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()
