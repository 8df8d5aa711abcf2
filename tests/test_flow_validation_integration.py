"""The held-out validation loss of a flow family through DeepSpeed's launcher, on the FLUX.1
[dev]-shaped test model (LoRA under ZeRO-2, `validation_split`, a validation every step): a finite
`val_loss` record per validation in metrics.jsonl, the first one (taken after a step at lr 0, so from
the base weights) equal to the loss computed in this process on the base transformer, on 1 process
uncached and on 2 processes from both encoder caches."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.helpers import TRANSFORMER_LORA, assert_ok, launch, transformer_run_cfg, validation_losses

pytestmark = pytest.mark.multiprocess

# Warmup over 1 step: the first optimizer step runs at lr 0, so validation at step 1 sees the base weights.
VALIDATED = (*TRANSFORMER_LORA, "validation_split=3", "validation_steps=1", "max_train_steps=2", "lr_warmup_steps=1")


def base_weights_loss(model_dir: Path, dataset_dir: Path) -> float:
    """The held-out loss of the untrained transformer on the run's held-out rows, computed in this process."""
    from diffusers import FluxTransformer2DModel

    from ds_diffusers.data import load_train_dataset
    from ds_diffusers.data.loading import split_held_out
    from ds_diffusers.families.flux import FLUX
    from ds_diffusers.models import load_frozen_components
    from ds_diffusers.validation_loss import HeldOutLoss
    from tests.helpers import SINGLE

    frozen = load_frozen_components(str(model_dir), torch.device("cpu"), torch.float32, None)
    _, held_out = split_held_out(load_train_dataset(dataset_dir, imagefolder=False), 3, seed=42)
    transformer = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer").eval()
    loss = HeldOutLoss(held_out, "image", "text", frozen, SINGLE, resolution=64, seed=42, num_timesteps=8)
    return loss(partial(FLUX.flow_forward, transformer, transformer.config), torch.float32)


def test_flux_lora_logs_the_held_out_loss_at_any_process_count_and_caching(flux_model, tiny_assets, tmp_path):
    one = launch(transformer_run_cfg(flux_model, tiny_assets.dataset_dir, tmp_path / "one", *VALIDATED))
    assert_ok(one)
    assert "at 8 fixed sigma(s) (0.0625, 0.1875, 0.3125, ...)" in one.stdout
    logged = validation_losses(tmp_path / "one" / "model")
    assert sorted(logged) == [1, 2] and all(math.isfinite(value) and value > 0 for value in logged.values())
    assert logged[1] != logged[2]  # step 2 trained at lr 0.01
    assert logged[1] == pytest.approx(base_weights_loss(flux_model, tiny_assets.dataset_dir), rel=1e-5)

    two = launch(transformer_run_cfg(flux_model, tiny_assets.dataset_dir, tmp_path / "two", *VALIDATED,
                                     "cache_latents=true", "cache_text_embeddings=true"), procs=2)
    assert_ok(two)
    assert validation_losses(tmp_path / "two" / "model")[1] == pytest.approx(logged[1], rel=1e-6)
