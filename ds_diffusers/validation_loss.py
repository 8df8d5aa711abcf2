"""The held-out validation loss: the denoising loss on `validation_split`'s rows at fixed timesteps
with fixed noise, averaged over rows and timesteps (the measure MLPerf's Flux benchmark judges
training by). An ε / v family scores its prediction type's target (`objective.prediction_and_target`)
at `validation_loss_timesteps` evenly spaced midpoints of the schedule; a flow family scores the
velocity noise − latents (`flow_matching.fixed_sigma_loss`) at as many unshifted sigmas, the midpoints
of even intervals of [0, 1] as torchtitan's Flux validator takes them. Neither is weighted (no min-SNR,
no `weighting_scheme`), so runs that weight their training loss differently compare.

Every number it uses is a function of (seed, row) alone: the image is centre-cropped and not
flipped, the caption is the row's first choice for epoch 0, the VAE posterior sample and the noise
come from a generator seeded with (seed, row), and the timesteps (sigmas) are fixed. So the loss of
the same weights is the same at any process count, cached or not, and comparable across runs with
the same seed. Each row is one forward pass of a batch of its timesteps; ranks take every world_size-th row and sum the losses at the end. All
ranks run the same number of forward passes (under ZeRO-3 each gathers parameters collectively); a
rank with fewer rows repeats its last one with zero weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch
import torch.nn.functional as F

from ds_diffusers.data.cache import TextCache
from ds_diffusers.data.dataset import CaptionedImageDataset, collate_examples, to_device
from ds_diffusers.data.seeding import seeded_generator
from ds_diffusers.distributed import DistInfo, sum_over_ranks
from ds_diffusers.families import family_named
from ds_diffusers.flow_matching import fixed_sigma_loss, fixed_sigmas
from ds_diffusers.models import FrozenComponents
from ds_diffusers.objective import encode_batch, prediction_and_target

NOISE_STREAM = 7302  # apart from the training streams and the held-out choice (data/loading.py)


def fixed_timesteps(num_train_timesteps: int, count: int) -> torch.Tensor:
    """`count` evenly spaced midpoints of [0, num_train_timesteps): 8 of 1000 give 62, 187, ..., 937."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * num_train_timesteps / count).long()


class HeldOutLoss:
    """Computes the validation loss of the denoiser the caller's `denoiser` runs: as the run's objective
    calls it in training, `unet_forward(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs)`
    for an ε / v family, and for a flow family its `flow_forward` bound to the denoiser,
    `denoiser(encoder_hidden_states, added_cond_kwargs)` -> `forward(noisy_latents, timesteps)`."""

    def __init__(self, held_out: datasets.Dataset, image_column: str, caption_column: str, frozen: FrozenComponents,
                 dist: DistInfo, *, resolution: int, seed: int, num_timesteps: int, text_cache: TextCache | None = None) -> None:
        # `text_cache`: the pre-pass's prompt cache, which holds these rows' captions when the encoders were freed.
        self.rows = CaptionedImageDataset(held_out, image_column, caption_column, frozen.tokenizer, resolution,
                                          center_crop=True, random_flip=False, seed=seed, text_cache=text_cache,
                                          tokenizer_2=frozen.tokenizer_2, tokenizer_3=frozen.tokenizer_3,
                                          record_crop=family_named(frozen.family).records_crop)
        self.frozen = frozen
        self.dist = dist
        self.seed = seed
        num_train_timesteps = frozen.noise_scheduler.config.num_train_timesteps
        self.flow = family_named(frozen.family).objective == "flow"
        self.sigmas = fixed_sigmas(num_timesteps) if self.flow else None
        self.timesteps = fixed_timesteps(num_train_timesteps, num_timesteps)

    def description(self) -> str:
        """The start-up line: how many rows, at which fixed points."""
        points = self.sigmas if self.flow else self.timesteps
        shown = ", ".join(f"{float(point):g}" for point in points[:3]) + (", ..." if len(points) > 3 else "")
        return (f"validation loss on {len(self)} held-out row(s) (never trained on) at {len(points)} fixed "
                f"{'sigma' if self.flow else 'timestep'}(s) ({shown})")

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, denoiser: Callable[..., Any], compute_dtype: torch.dtype) -> float:
        """All ranks: the mean loss over the held-out rows and the fixed timesteps."""
        total = sum_over_ranks(self.local_totals(denoiser, compute_dtype))
        return float(total[0] / total[1])

    @torch.no_grad()
    def local_totals(self, denoiser: Callable[..., Any], compute_dtype: torch.dtype) -> torch.Tensor:
        """(sum of this rank's row losses, its row count), in fp64."""
        device = self.dist.device
        mine = list(range(self.dist.rank, len(self.rows), self.dist.world_size))
        passes = -(-len(self.rows) // self.dist.world_size)  # the same on every rank
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for position in range(passes):
            row = mine[min(position, len(mine) - 1)] if mine else 0
            loss = self.row_loss(row, denoiser, compute_dtype, device)
            if position < len(mine):
                total += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=device)])
        return total

    def row_loss(self, row: int, denoiser: Callable[..., Any], compute_dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        """The loss of one held-out row, averaged over the fixed timesteps or sigmas (one batched forward pass)."""
        # Its own generator, not the global RNG: the training streams (every device's) must not notice
        # validation, or resumed runs would diverge.
        generator = seeded_generator(self.seed, NOISE_STREAM, row)
        encoded = encode_batch(self.frozen, to_device(collate_examples([self.rows[row]]), device), generator)
        count = len(self.timesteps)

        def per_timestep(tensor: torch.Tensor) -> torch.Tensor:  # the row, once per timestep
            return tensor.expand(count, *tensor.shape[1:])

        latents = per_timestep(encoded.latents.float())
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(device)
        added = None
        if encoded.added_cond_kwargs is not None:
            added = {name: per_timestep(value) for name, value in encoded.added_cond_kwargs.items()}
        encoder_hidden_states = per_timestep(encoded.encoder_hidden_states)
        if self.sigmas is not None:
            return fixed_sigma_loss(denoiser(encoder_hidden_states, added), latents, noise, self.sigmas,
                                    self.frozen.noise_scheduler.config.num_train_timesteps, compute_dtype=compute_dtype)
        prediction, target = prediction_and_target(denoiser, self.frozen, latents, encoder_hidden_states, noise,
                                                   self.timesteps.to(device), compute_dtype=compute_dtype,
                                                   added_cond_kwargs=added)
        return F.mse_loss(prediction, target)
