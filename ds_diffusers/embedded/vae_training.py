"""Short CPU training of the tiny VAE as an autoencoder of freshly rendered shapes.

A random-init VAE decodes anything to noise, so samples from a UNet trained on its latents would
say nothing about whether the UNet learned the captions. A minute or two of reconstruction
training is enough for these flat-colour images.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL

from ds_diffusers.embedded.shapes import CLASSES, render


def rendered_batch(batch_size: int, rng: np.random.Generator) -> torch.Tensor:
    """`batch_size` random shapes as a float tensor in [-1, 1], shape (B, 3, 64, 64)."""
    arrays = []
    for _ in range(batch_size):
        color, shape = CLASSES[int(rng.integers(len(CLASSES)))]
        arrays.append(np.asarray(render(color, shape, rng)))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1.0


def train_vae(vae: AutoencoderKL, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int) -> float:
    """Train `vae` in place on reconstruction (MSE + L1) plus a small KL; returns the last MSE.

    The KL is averaged per latent element and kept small: it only has to stop the posterior from
    collapsing to a point (so `latent_dist.sample()` in training stays meaningful), not to shape a
    prior, because the diffusion model is the prior.
    """
    rng = np.random.default_rng(seed)
    noise_generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    # Linear warmup then linear decay to 5%: the decay tail sharpens edges noticeably.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.05, 1.0 - step / max(1, steps))
    )
    vae.train()
    mse = float("nan")
    for _ in range(steps):
        pixels = rendered_batch(batch_size, rng)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.sample(generator=noise_generator)
        reconstruction = vae.decode(latents).sample
        mse_loss = (reconstruction - pixels).pow(2).mean()
        kl_loss = posterior.kl().mean() / latents[0].numel()
        loss = mse_loss + (reconstruction - pixels).abs().mean() + kl_weight * kl_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        mse = float(mse_loss.detach())
    vae.eval()
    return mse


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, num_images: int, seed: int) -> float:
    """1 / std of sampled latents over fresh images, so scaled latents have ~unit variance (as SD's 0.18215)."""
    pixels = rendered_batch(num_images, np.random.default_rng(seed))
    latents = vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(seed))
    return float(1.0 / latents.std())
