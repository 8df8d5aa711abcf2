"""The denoising objective: batch -> latents, noise, timesteps -> UNet prediction -> fp32 loss.

Random draws (VAE posterior sample, noise, offset noise, timesteps) use the process's global torch
RNG, seeded per rank at start-up, so a run is reproducible and its RNG state can be checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr

from ds_diffusers.families import family_named
from ds_diffusers.families.sdxl import add_time_ids  # noqa: F401  (its home before the families package)
from ds_diffusers.models import FrozenComponents


@dataclass
class EncodedBatch:
    """What the UNet is conditioned on. `added_cond_kwargs`: the family's conditioning beyond the text
    (`ModelFamily.added_conditioning`; SDXL's {"text_embeds", "time_ids"}), None for SD 1.x/2.x."""

    latents: torch.Tensor
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None


@torch.no_grad()
def encode_batch(frozen: FrozenComponents, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> EncodedBatch:
    """Latents (scaled) and text conditioning, in the frozen models' dtype, from the encoders or
    from cached outputs. A cached posterior is sampled exactly as `latent_dist.sample()` would be,
    so cached and uncached runs draw the same random numbers: from the global RNG, or `generator`."""
    vae = frozen.vae
    family = family_named(frozen.family)
    if "latent_parameters" in batch:
        posterior = DiagonalGaussianDistribution(batch["latent_parameters"].to(vae.device, vae.dtype))
    else:
        posterior = family.latent_distribution(vae, batch["pixel_values"].to(vae.device, vae.dtype))
    # A VAE with mid-block attention (every SD VAE) returns channels-last posteriors for batches of 2
    # or more; the cache stores them contiguous. Latents in one layout keep the two paths identical.
    latents = family.image_latents(frozen, posterior.sample(generator)).contiguous()
    if "encoder_hidden_states" in batch:
        text = {name: batch[name] for name in family.text_outputs}
    else:
        text = frozen.encode_text({name: batch[name] for name in frozen.tokenizers if name in batch})
    text = {name: tensor.to(vae.device, frozen.weight_dtype) for name, tensor in text.items()}
    added = family.added_conditioning(frozen, batch, text, latents)
    return EncodedBatch(latents, text["encoder_hidden_states"], added)


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
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean-squared error of the UNet's prediction, computed in fp32 whatever the compute dtype."""
    scheduler = frozen.noise_scheduler
    latents = latents.float()
    # torch.randn with the shape, not randn_like: randn_like follows the input's memory layout, so
    # the same seed would give other noise to a channels-last batch.
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        # Offset noise (Guttenberg 2023): lets the model learn very dark/bright images.
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    # Input perturbation (Ning et al. 2023), as diffusers' script: the noised input uses perturbed
    # noise, the target stays the unperturbed one. Drawn in the script's order (before the timesteps).
    input_noise = noise
    if input_perturbation:
        input_noise = noise + input_perturbation * torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    batch = latents.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=latents.device).long()
    model_pred, target = prediction_and_target(unet_forward, frozen, latents, encoder_hidden_states, noise, timesteps,
                                               compute_dtype=compute_dtype, input_noise=input_noise,
                                               added_cond_kwargs=added_cond_kwargs)
    prediction_type = scheduler.config.prediction_type
    if snr_gamma is None:
        return F.mse_loss(model_pred, target, reduction="mean")
    # Min-SNR weighting (Hang et al. 2023), as in diffusers' reference recipe.
    snr = compute_snr(scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    per_sample = F.mse_loss(model_pred, target, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def prediction_and_target(
    unet_forward: Callable[..., torch.Tensor],
    frozen: FrozenComponents,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    compute_dtype: torch.dtype,
    input_noise: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's prediction for fp32 `latents` noised with `input_noise` (default `noise`) at
    `timesteps`, and the fp32 target the scheduler's prediction type asks for; the training loss and
    the held-out validation loss (fixed noise and timesteps) both start here."""
    scheduler = frozen.noise_scheduler
    noisy_latents = scheduler.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    unet_inputs = (noisy_latents.to(compute_dtype), timesteps, encoder_hidden_states.to(compute_dtype))
    if added_cond_kwargs is None:
        model_pred = unet_forward(*unet_inputs)
    else:
        model_pred = unet_forward(*unet_inputs, {name: value.to(compute_dtype) for name, value in added_cond_kwargs.items()})
    return model_pred.float(), target
