"""The flow-matching objective (flow_matching.py) against diffusers' DreamBooth Flux/SD3 scripts as
an oracle, the distribution of its sampled sigmas, and the per-family check of the objective keys."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from ds_diffusers.config import validate_dict
from ds_diffusers.config.checks import check_environment
from ds_diffusers.errors import ConfigError
from ds_diffusers.families import FAMILIES, SD, SDXL, ModelFamily
from ds_diffusers.flow_matching import FlowSettings, flow_matching_loss, sample_sigmas, training_scheduler
from tests.helpers import environment_cfg, with_changes

SCHEDULER_CONFIG = dict(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).config)


def script_oracle(latents: torch.Tensor, settings: FlowSettings, scheduler: FlowMatchEulerDiscreteScheduler):
    """What train_dreambooth_flux.py / train_dreambooth_lora_sd3.py compute after the same seed: noise,
    u, timesteps from the table, sigmas looked up by timestep (their get_sigmas), noisy input, target."""
    noise = torch.randn_like(latents)
    u = compute_density_for_timestep_sampling(weighting_scheme=settings.weighting_scheme, batch_size=latents.shape[0],
                                              logit_mean=settings.logit_mean, logit_std=settings.logit_std,
                                              mode_scale=settings.mode_scale)
    timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    return timesteps, (1.0 - sigmas) * latents + sigmas * noise, noise - latents, sigmas


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
def test_noisy_input_target_and_weighting_match_the_diffusers_scripts(scheme):
    scheduler = training_scheduler(SCHEDULER_CONFIG, shift=None)
    settings = FlowSettings(scheme, logit_mean=0.3, logit_std=0.9, mode_scale=1.29)
    latents = torch.randn(6, 4, 8, 8)
    seen = {}

    def denoiser(noisy_latents, timesteps):
        seen["noisy"], seen["timesteps"] = noisy_latents, timesteps
        return torch.zeros_like(noisy_latents)

    torch.manual_seed(0)
    loss = flow_matching_loss(denoiser, scheduler, latents, settings, compute_dtype=torch.float32)
    torch.manual_seed(0)
    timesteps, noisy, target, sigmas = script_oracle(latents, settings, scheduler)
    assert torch.equal(seen["timesteps"], timesteps)
    torch.testing.assert_close(seen["noisy"], noisy)
    weights = {"sigma_sqrt": sigmas ** -2.0, "cosmap": 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))}.get(scheme, 1.0)
    # A zero prediction's loss is the weighted mean square of the target noise − latents.
    torch.testing.assert_close(loss, (weights * target ** 2).reshape(6, -1).mean(dim=1).mean())


def test_the_true_velocity_scores_zero_and_an_epsilon_prediction_does_not():
    """A denoiser that knows the clean latents answers noise − latents exactly from the noisy input
    and σ; answering the noise (ε prediction) is not the flow target."""
    scheduler = training_scheduler(SCHEDULER_CONFIG, shift=None)
    latents = torch.randn(4, 4, 8, 8)

    def recovered_noise(noisy_latents, timesteps):
        sigmas = (timesteps / 1000).view(-1, 1, 1, 1)
        return (noisy_latents - (1 - sigmas) * latents) / sigmas

    velocity = flow_matching_loss(lambda noisy, t: recovered_noise(noisy, t) - latents, scheduler, latents,
                                  FlowSettings(), compute_dtype=torch.float32)
    epsilon = flow_matching_loss(recovered_noise, scheduler, latents, FlowSettings(), compute_dtype=torch.float32)
    assert float(velocity) < 1e-8 and float(epsilon) > 0.5


def _mode_map(u: float, scale: float) -> float:
    return 1 - u - scale * (math.cos(math.pi * u / 2) ** 2 - 1 + u)


def _logit_normal_quantile(q: float, mean: float, std: float) -> float:
    # σ ≈ 1 − u and u = sigmoid(z), z ~ N(mean, std): σ = sigmoid(−z), so a positive mean means less noise.
    return 1 / (1 + math.exp(mean - std * float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(q)))))


def _shifted(sigma: float, shift: float) -> float:
    return shift * sigma / (1 + (shift - 1) * sigma)


@pytest.mark.parametrize("scheme, shift, quantile", [
    ("none", None, lambda q: q),
    ("none", 3.0, lambda q: _shifted(q, 3.0)),
    ("logit_normal", None, lambda q: _logit_normal_quantile(q, 0.5, 0.8)),
    ("mode", None, lambda q: 1 - _mode_map(q, 1.29)),
    ("logit_normal", 2.0, lambda q: _shifted(_logit_normal_quantile(q, 0.5, 0.8), 2.0)),
])
def test_sampled_sigmas_follow_the_density_and_the_shift(scheme, shift, quantile):
    """Quantiles of 40,000 sampled sigmas against the analytic ones (the table's 1/1000 steps and the
    sampling error are both well inside 0.01)."""
    scheduler = training_scheduler(SCHEDULER_CONFIG | {"shift": 1.0}, shift=shift)
    torch.manual_seed(0)
    timesteps, sigmas = sample_sigmas(scheduler, FlowSettings(scheme, 0.5, 0.8, 1.29), 40_000, torch.device("cpu"))
    torch.testing.assert_close(timesteps, sigmas * 1000)
    levels = torch.linspace(0.05, 0.95, 19)
    measured = torch.quantile(sigmas, levels)
    expected = torch.tensor([quantile(float(q)) for q in levels])
    torch.testing.assert_close(measured, expected, atol=0.01, rtol=0)


def test_flow_shift_replaces_the_scheduler_configs_shift():
    table = training_scheduler(SCHEDULER_CONFIG, shift=1.5).sigmas
    torch.testing.assert_close(table, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.5).sigmas)
    torch.testing.assert_close(training_scheduler(SCHEDULER_CONFIG, shift=None).sigmas,
                               FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).sigmas)


class TinyFlowFamily(ModelFamily):
    """A flow-matching family for the checks only (no weights are loaded)."""

    name = "tiny-flow"
    title = "Tiny Flow"
    pipeline_classes = ("TinyFlowPipeline",)
    objective = "flow"


@pytest.mark.parametrize("key, value", [("prediction_type", "epsilon"), ("snr_gamma", 5.0)])
def test_an_epsilon_key_on_a_flow_family_stops_with_one_line(tmp_path, monkeypatch, key, value):
    cfg = environment_cfg(tmp_path, **{key: value})
    (tmp_path / "model" / "model_index.json").write_text(json.dumps({"_class_name": "TinyFlowPipeline"}))
    monkeypatch.setitem(FAMILIES, TinyFlowFamily.name, TinyFlowFamily())
    with pytest.raises(ConfigError) as info:
        check_environment(cfg)
    assert info.value.field == key and "Tiny Flow is a flow-matching model" in info.value.fix
    assert "\n" not in str(info.value)
    TinyFlowFamily().check_config(environment_cfg(tmp_path / "ok", weighting_scheme="logit_normal", flow_shift=3.0))


@pytest.mark.parametrize("family", [SD, SDXL])
@pytest.mark.parametrize("key, value", [("weighting_scheme", "logit_normal"), ("flow_shift", 3.0), ("logit_std", 2.0)])
def test_a_flow_key_on_an_sd_family_stops(family, key, value):
    with pytest.raises(ConfigError) as info:
        family.check_config(validate_dict(with_changes(**{key: value})))
    assert info.value.field == key and family.title in info.value.fix
    family.check_config(validate_dict(with_changes(prediction_type="v_prediction", snr_gamma=5.0)))


def test_mode_scale_outside_the_monotone_range_is_refused():
    with pytest.raises(Exception, match="mode_scale"):
        validate_dict(with_changes(mode_scale=2.0))
