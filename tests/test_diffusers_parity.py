"""Behaviours matched to diffusers' train_text_to_image.py: optimizer steps per epoch with a partial
accumulation window flushed at the epoch end, input perturbation, max_train_samples, and the defaults."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
import torch
from diffusers import DDPMScheduler

from ds_diffusers.config import validate_dict
from ds_diffusers.data import select_train_samples
from ds_diffusers.objective import diffusion_loss
from ds_diffusers.run_plan import RunPlan
from tests.helpers import with_changes


def plan(rows: int, micro: int, accumulation: int, world: int = 1, **changes) -> RunPlan:
    cfg = validate_dict(with_changes(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accumulation, **changes))
    return RunPlan.from_config(cfg, rows, world)


def test_a_partial_window_at_the_epoch_end_is_one_more_step():
    # 10 micro-batches per epoch in windows of 4: 4, 4, 2 -> 3 steps, as accelerate's ceil(len / accumulation).
    three_epochs = plan(40, 4, 4, num_epochs=3, max_train_steps=0)
    assert (three_epochs.batches_per_epoch, three_epochs.steps_per_epoch, three_epochs.total_steps) == (10, 3, 9)
    assert [b for b in range(10) if three_epochs.ends_window(b)] == [3, 7, 9]
    capped = plan(40, 4, 4, max_train_steps=4)
    assert (capped.total_steps, capped.num_epochs) == (4, 2)
    exact = plan(40, 4, 5, num_epochs=2, max_train_steps=0)
    assert exact.steps_per_epoch == 2 and [b for b in range(10) if exact.ends_window(b)] == [4, 9]


def test_input_perturbation_perturbs_the_input_noise_not_the_target():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    frozen = SimpleNamespace(noise_scheduler=scheduler)
    latents, hidden = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16)
    seen = {}

    def unet_forward(noisy_latents, timesteps, encoder_hidden_states):
        seen["noisy"], seen["timesteps"] = noisy_latents, timesteps
        return torch.zeros_like(noisy_latents)

    torch.manual_seed(0)
    plain = diffusion_loss(unet_forward, frozen, latents, hidden, compute_dtype=torch.float32)
    torch.manual_seed(0)
    perturbed = diffusion_loss(unet_forward, frozen, latents, hidden, compute_dtype=torch.float32, input_perturbation=0.1)
    # Drawn in the script's order: noise, perturbation, timesteps.
    torch.manual_seed(0)
    noise = torch.randn_like(latents)
    extra = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (2,)).long()
    assert torch.equal(seen["timesteps"], timesteps)
    torch.testing.assert_close(seen["noisy"], scheduler.add_noise(latents, noise + 0.1 * extra, timesteps))
    # A zero prediction's loss is the target's mean square: the unperturbed noise in both runs.
    assert perturbed == pytest.approx(float(noise.pow(2).mean())) and plain == pytest.approx(perturbed)


def test_max_train_samples_is_a_seeded_subset_like_the_script():
    dataset = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(50)]})
    subset = select_train_samples(dataset, 10, seed=3)
    # diffusers: dataset["train"].shuffle(seed=args.seed).select(range(args.max_train_samples))
    assert subset["text"] == dataset.shuffle(seed=3).select(range(10))["text"]
    assert subset["text"] != select_train_samples(dataset, 10, seed=4)["text"]
    assert select_train_samples(dataset, None, seed=3) is dataset and select_train_samples(dataset, 99, seed=3) is dataset


def test_defaults_a_diffusers_user_expects():
    raw = with_changes()
    for key in ("save_interval", "gradient_clipping", "lr_warmup_steps", "scheduler"):
        raw.pop(key, None)
    cfg = validate_dict(raw)
    assert cfg.gradient_clipping == 1.0 and cfg.save_interval == 500  # --max_grad_norm, --checkpointing_steps
    assert cfg.lr_warmup_steps == 0 and cfg.scheduler.type == "WarmupLR"  # constant lr, as --lr_scheduler constant
    assert cfg.caption_dropout == 0.0 and cfg.input_perturbation == 0.0 and cfg.max_train_samples is None
