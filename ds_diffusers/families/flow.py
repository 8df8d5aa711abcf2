"""What the flow-matching transformer families (FLUX.1, SD 3.x) share: a `transformer/` trained with the
flow objective, `FlowMatchEulerDiscreteScheduler` for training and sampling, the 16-channel VAE's
shifted and scaled latents, a pooled text vector as the transformer's `pooled_projections`, and a
LoRA file their pipeline's `save_lora_weights` writes in peft's names under `transformer.`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ds_diffusers.errors import ConfigError
from ds_diffusers.families.base import ModelFamily

if TYPE_CHECKING:
    from ds_diffusers.config.schema import Config


def check_packed_resolution(cfg: "Config", title: str) -> None:
    """Latents are 1/8 of the image and go to the transformer in 2×2 patches: the pipelines refuse other sizes."""
    if cfg.resolution % 16:
        lower = cfg.resolution // 16 * 16
        raise ConfigError("resolution", cfg.resolution, f"{title} takes 2×2 patches of latents 1/8 the image: "
                          f"use a multiple of 16 ({lower} or {lower + 16})")


class FlowTransformerFamily(ModelFamily):
    text_outputs = ("encoder_hidden_states", "pooled_projections")
    objective = "flow"
    denoiser_folder = "transformer"
    # `shift` given to the training scheduler in place of its config's (None: the config's).
    training_shift: ClassVar[float | None] = None

    def check_config(self, cfg: "Config") -> None:
        super().check_config(cfg)
        check_packed_resolution(cfg, self.title)

    def load_noise_scheduler(self, model_dir: str) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        overrides = {} if self.training_shift is None else {"shift": self.training_shift}
        return FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler", **overrides)

    def image_latents(self, frozen: Any, posterior_sample: torch.Tensor) -> torch.Tensor:
        config = frozen.vae.config
        return (posterior_sample - config.shift_factor) * config.scaling_factor

    def added_conditioning(self, frozen: Any, batch: dict[str, torch.Tensor], text: dict[str, torch.Tensor],
                           latents: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pooled_projections": text["pooled_projections"]}

    def save_lora_weights(self, out_dir: Any, lora_state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        # As the DreamBooth LoRA scripts save them: peft's names under `transformer.`, which the pipeline reads.
        import diffusers

        pipeline_class = getattr(diffusers, self.pipeline_classes[0])
        pipeline_class.save_lora_weights(out_dir, transformer_lora_layers=lora_state, safe_serialization=True,
                                         transformer_lora_adapter_metadata=metadata)

    def sampling_scheduler(self, scheduler_config: Any) -> Any:
        # The pipelines' own sampler: Euler on the flow, with the config's shift (FLUX.1 [dev]: resolution-dependent).
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
