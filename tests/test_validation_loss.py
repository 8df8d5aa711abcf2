"""The held-out validation loss: which rows are held out, the fixed timesteps (a flow family's fixed
sigmas), and a loss that is a function of the weights alone (the same at any process count, again when
called again, and without touching the training RNG); the flow form against a written-out oracle. Its
exact resume on 2 processes is in test_checkpoint_integration, FLUX.1's launcher runs in
test_flow_validation_integration."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel

from ds_diffusers.config import validate_dict
from ds_diffusers.config.checks import check_consistency
from ds_diffusers.data.dataset import collate_examples
from ds_diffusers.data.loading import split_held_out
from ds_diffusers.data.seeding import seeded_generator
from ds_diffusers.distributed import DistInfo
from ds_diffusers.errors import ConfigError
from ds_diffusers.families.flux import FLUX
from ds_diffusers.flow_matching import fixed_sigmas
from ds_diffusers.models import load_frozen_components
from ds_diffusers.objective import encode_batch
from ds_diffusers.validation_loss import NOISE_STREAM, HeldOutLoss, fixed_timesteps
from tests.helpers import error_of, in_memory_dataset, with_changes


def test_held_out_rows_are_drawn_by_the_seed_and_never_trained_on():
    dataset = in_memory_dataset(20).add_column("row", list(range(20)))
    train, held_out = split_held_out(dataset, 0.3, seed=5)
    assert len(held_out) == 6 and len(train) == 14
    assert set(train["row"]).isdisjoint(held_out["row"]) and set(train["row"]) | set(held_out["row"]) == set(range(20))
    assert held_out["row"] == sorted(held_out["row"]) != list(range(6))  # drawn, in the dataset's order
    assert split_held_out(dataset, 6, seed=5)[1]["row"] == held_out["row"]  # a count, the same rows
    assert split_held_out(dataset, 6, seed=6)[1]["row"] != held_out["row"]
    assert split_held_out(dataset, 0, seed=5) == (dataset, None)
    assert len(split_held_out(dataset, 0.01, seed=5)[1]) == 1  # a fraction holds out at least one row
    with pytest.raises(ConfigError, match="validation_split=20: holds out 20 of the dataset's 20 rows"):
        split_held_out(dataset, 20, seed=5)


@pytest.mark.parametrize("changes, field, words", [
    ({"validation_split": 2.5}, "validation_split", "must be whole"),
    ({"validation_split": 4, "validation_epochs": 0}, "validation_split", "never validated on"),
    ({"validation_prompts": []}, "validation_prompts", "hold out rows with validation_split"),
])
def test_validation_split_settings_are_checked(changes, field, words):
    error = error_of(with_changes(**changes))
    assert error.field == field and words in str(error)


def test_a_held_out_split_alone_is_enough_to_validate():
    cfg = validate_dict(with_changes(validation_prompts=[], validation_split=0.1))
    check_consistency(cfg)
    assert cfg.validation_split == 0.1 and cfg.validation_loss_timesteps == 8


def test_fixed_timesteps_are_the_midpoints_of_even_intervals():
    assert fixed_timesteps(1000, 8).tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    assert fixed_timesteps(1000, 1).tolist() == [500]


@pytest.fixture(scope="module")
def tiny_unet_and_frozen(tiny_assets):
    frozen = load_frozen_components(str(tiny_assets.model_dir), torch.device("cpu"), torch.float32, None)
    unet = UNet2DConditionModel.from_pretrained(tiny_assets.model_dir, subfolder="unet").eval()

    def forward(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        return unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]

    return frozen, forward


def held_out_loss(frozen, rank: int, world_size: int, rows: int = 5, count: int = 4) -> HeldOutLoss:
    dist = DistInfo(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
    return HeldOutLoss(in_memory_dataset(rows), "image", "text", frozen, dist, resolution=32, seed=3, num_timesteps=count)


def test_the_loss_is_the_same_at_any_process_count(tiny_unet_and_frozen):
    """Each row's loss is a function of (seed, row): 5 rows over 1, 2 or 3 ranks sum to the same
    totals (a rank with fewer rows repeats one with zero weight, so all run as many forward passes)."""
    frozen, forward = tiny_unet_and_frozen
    one = held_out_loss(frozen, 0, 1).local_totals(forward, torch.float32)
    assert one[1] == 5 and 0 < one[0] / 5 < 10
    for world_size in (2, 3):
        split = sum(held_out_loss(frozen, rank, world_size).local_totals(forward, torch.float32) for rank in range(world_size))
        assert torch.allclose(split, one, rtol=1e-6, atol=0), (world_size, split, one)


def test_the_loss_is_repeatable_and_leaves_the_training_rng_alone(tiny_unet_and_frozen):
    frozen, forward = tiny_unet_and_frozen
    loss = held_out_loss(frozen, 0, 1, rows=2)
    torch.manual_seed(11)
    state = torch.get_rng_state()
    first = loss(forward, torch.float32)
    assert torch.equal(torch.get_rng_state(), state)  # the training streams do not notice validation
    assert loss(forward, torch.float32) == first
    assert "on 2 held-out row(s) (never trained on) at 4 fixed timestep(s) (125, 375, 625, ...)" in loss.description()


def test_the_loss_tells_the_weights_apart(tiny_unet_and_frozen):
    """A UNet predicting zeros scores E[target²], about 1 for ε targets; the tiny UNet scores otherwise."""
    frozen, forward = tiny_unet_and_frozen
    loss = held_out_loss(frozen, 0, 1, rows=3)
    trained = loss(forward, torch.float32)
    zeros = loss(lambda latents, *_: torch.zeros_like(latents), torch.float32)
    assert 0.8 < zeros < 1.2 and abs(trained - zeros) > 1e-3


def test_sdxl_rows_carry_their_size_and_crop_conditioning(sdxl_model):
    """SDXL: both text encoders, and the time ids of the centre crop of each row (the rows' images
    differ in size), at any process count."""
    frozen = load_frozen_components(str(sdxl_model), torch.device("cpu"), torch.float32, None)
    unet = UNet2DConditionModel.from_pretrained(sdxl_model, subfolder="unet").eval()
    seen = []

    def forward(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs):
        seen.append(added_cond_kwargs["time_ids"][0].tolist())
        return unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]

    one = held_out_loss(frozen, 0, 1, rows=3).local_totals(forward, torch.float32)
    sizes = [list(image.size[::-1]) for image in in_memory_dataset(3)["image"]]  # (height, width)
    assert [ids[:2] for ids in seen] == sizes and all(ids[4:] == [32, 32] for ids in seen)
    split = sum(held_out_loss(frozen, rank, 2, rows=3).local_totals(forward, torch.float32) for rank in range(2))
    assert torch.allclose(split, one, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def flux_frozen(flux_model):
    return load_frozen_components(str(flux_model), torch.device("cpu"), torch.float32, None)


def test_fixed_sigmas_are_the_unshifted_midpoints_of_even_intervals(flux_frozen):
    """A flow family scores at σ = (i + ½) / count, whatever the scheduler's shift (FLUX.1 [dev]'s is dynamic)."""
    assert fixed_sigmas(8).tolist() == [0.0625, 0.1875, 0.3125, 0.4375, 0.5625, 0.6875, 0.8125, 0.9375]
    assert fixed_sigmas(1).tolist() == [0.5]
    gaps = fixed_sigmas(5).diff()
    assert torch.allclose(gaps, torch.full_like(gaps, 0.2))
    loss = held_out_loss(flux_frozen, 0, 1, count=8)
    assert torch.equal(loss.sigmas, fixed_sigmas(8))
    assert "on 5 held-out row(s) (never trained on) at 8 fixed sigma(s) (0.0625, 0.1875, 0.3125, ...)" in loss.description()


def test_the_flow_loss_is_the_velocity_error_at_the_fixed_sigmas(flux_frozen):
    """A stub denoiser whose velocity is 0.5·x_σ scores, written out row by row and sigma by sigma,
    mean((0.5·((1 − σ)·x + σ·n) − (n − x))²), x the row's latents and n its noise, both from (seed, row);
    the denoiser gets σ·1000 and the row's conditioning once per sigma."""
    loss = held_out_loss(flux_frozen, 0, 1, rows=2, count=4)
    calls = []

    def conditioned(encoder_hidden_states, added_cond_kwargs):
        def forward(noisy_latents, timesteps):
            calls.append((timesteps.tolist(), encoder_hidden_states.shape[0], added_cond_kwargs["pooled_projections"].shape[0]))
            return 0.5 * noisy_latents

        return forward

    value = loss(conditioned, torch.float32)
    expected = []
    for row in range(2):
        generator = seeded_generator(3, NOISE_STREAM, row)
        latents = encode_batch(flux_frozen, collate_examples([loss.rows[row]]), generator).latents[0].double()
        noise = torch.randn((4, *latents.shape), generator=generator).double()
        for index, sigma in enumerate([0.125, 0.375, 0.625, 0.875]):
            noisy = (1 - sigma) * latents + sigma * noise[index]
            expected.append(((0.5 * noisy - (noise[index] - latents)) ** 2).mean())
    assert value == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)
    assert calls == [([125.0, 375.0, 625.0, 875.0], 4, 4)] * 2


def test_the_flow_loss_is_the_same_at_any_process_count(flux_model, flux_frozen):
    """FLUX.1's transformer called through its `flow_forward`, as training calls it: 3 rows over 1 or 2 ranks."""
    transformer = FluxTransformer2DModel.from_pretrained(flux_model, subfolder="transformer").eval()
    conditioned = partial(FLUX.flow_forward, transformer, transformer.config)
    one = held_out_loss(flux_frozen, 0, 1, rows=3).local_totals(conditioned, torch.float32)
    assert one[1] == 3 and 0 < one[0] / 3 < 10
    split = sum(held_out_loss(flux_frozen, rank, 2, rows=3).local_totals(conditioned, torch.float32) for rank in range(2))
    assert torch.allclose(split, one, rtol=1e-6, atol=0), (split, one)


def test_a_validation_folder_gives_the_held_out_rows(tmp_path):
    """`validation_dataset_dir` instead of a split: all training rows stay, the folder's rows are held
    out, and its refusals name that key."""
    from ds_diffusers.data import prepare_train_data
    from ds_diffusers.distributed import StoppedOnEveryRank
    from tests.helpers import SINGLE

    in_memory_dataset(6).save_to_disk(str(tmp_path / "train"))
    in_memory_dataset(3).save_to_disk(str(tmp_path / "held"))
    in_memory_dataset(3).rename_column("text", "words").save_to_disk(str(tmp_path / "other-columns"))
    raw = with_changes(dataset_dir=str(tmp_path / "train"), train_micro_batch_size_per_gpu=2, validation_epochs=1,
                       validation_dataset_dir=str(tmp_path / "held"))
    prepared = prepare_train_data(validate_dict(raw), SINGLE)
    assert len(prepared.dataset) == 6 and len(prepared.held_out) == 3
    with pytest.raises(StoppedOnEveryRank) as caught:
        prepare_train_data(validate_dict({**raw, "validation_dataset_dir": str(tmp_path / "other-columns")}), SINGLE)
    assert caught.value.field == "validation_dataset_dir" and "caption_column='text'" in caught.value.fix
    assert error_of({**raw, "validation_split": 0.1}).field == "validation_dataset_dir"
    assert "never be validated on" in str(error_of({**raw, "validation_epochs": 0, "validation_steps": 0}))


def test_a_missing_validation_folder_is_refused_before_any_work(tmp_path):
    from ds_diffusers.config import check_environment
    from tests.helpers import environment_cfg

    with pytest.raises(ConfigError, match="validation_dataset_dir='.*nope': no such folder"):
        check_environment(environment_cfg(tmp_path, validation_dataset_dir=str(tmp_path / "nope"), validation_epochs=1))


@pytest.mark.parametrize("model", ["sd3_model", "qwen_image_model"])
def test_every_flow_family_scores_held_out_rows_through_its_own_call(model, request):
    """SD 3.5 (pooled projections) and Qwen-Image (the text mask, packed latents) through their
    `flow_forward`: a finite loss, the same on 1 rank as over 2."""
    from ds_diffusers.families import detect_family

    model_dir = str(request.getfixturevalue(model))
    family = detect_family(model_dir)
    frozen = load_frozen_components(model_dir, torch.device("cpu"), torch.float32, None)
    denoiser = family.load_denoiser(model_dir, None, 0, None).eval()
    conditioned = partial(family.flow_forward, denoiser, denoiser.config)
    one = held_out_loss(frozen, 0, 1, rows=3).local_totals(conditioned, torch.float32)
    assert one[1] == 3 and 0 < one[0] / 3 < 10
    split = sum(held_out_loss(frozen, rank, 2, rows=3).local_totals(conditioned, torch.float32) for rank in range(2))
    assert torch.allclose(split, one, rtol=1e-6, atol=0), (split, one)
