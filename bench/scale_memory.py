"""Memory a full-size run needs per rank: our fp32 CPU accounting next to DeepSpeed's estimators.

DeepSpeed's `estimate_zero2/3_model_states_mem_needs` (what `*_all_live` prints for a live model)
assume mixed precision on GPUs: 16-bit parameters and gradients on the device, fp32 master weights,
fp32 gradients and Adam moments partitioned over the ranks (18 bytes a parameter besides the 16-bit
copy), plus a host copy for loading. A CPU run here trains in fp32, so there is no 16-bit copy, and
both "device" and "host" are the same RAM. They also count trainable parameters only: the frozen VAE
and text encoder, a LoRA run's frozen UNet weights, activations and the runtime are outside them.
`plan_memory` counts all of it, so the bench can skip what cannot fit and explain the difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GB = 2**30
# Python, torch, DeepSpeed and diffusers in one process, plus 64 px activations of SD 1.5 at batch 1
# (measured RSS of a LoRA ZeRO-0 run less its weights: about 1.5 GB).
RUNTIME_BYTES = 1.5 * GB
# DeepSpeed's default reduce_bucket_size (5e8 elements): a gradient bucket held in fp32 under ZeRO-1/2/3.
DEFAULT_BUCKET_ELEMENTS = int(5e8)
LORA_RANK = 4


@dataclass(frozen=True)
class MemoryPlan:
    unet_params: int
    trainable_params: int
    largest_layer_params: int
    frozen_params: int  # VAE + text encoder, outside the engine
    per_rank_gb: float  # our accounting, everything one rank holds at its peak
    deepspeed_gb: float  # DeepSpeed's estimator per rank (device + its share of the host), trainable params only


def _count(build) -> tuple[int, int]:
    import torch

    with torch.device("meta"):
        module = build()
    total = sum(p.numel() for p in module.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())
    return total, largest


def _lora_params(unet_config: dict[str, Any]) -> int:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    import torch

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    return sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)


def plan_memory(unet_config: dict[str, Any], mode: str, stage: int, procs: int,
                bucket_elements: int = DEFAULT_BUCKET_ELEMENTS, bf16: bool = False,
                nvme_sub_group: int | None = None) -> MemoryPlan:
    """bf16: 2-byte compute weights, frozen models and gradients besides the fp32 masters and moments
    (ZeRO-3 makes an fp32 copy of each gradient partition for the step, counted as 4 bytes).
    nvme_sub_group: ZeRO-3 with the optimizer offloaded to NVMe, stepping sub-groups of that many
    elements: the fp32 masters and moments live on disk, RAM holds the swap buffers (DeepSpeed's
    default 4 buffers a sub-group: master, two moments, gradient)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ds_diffusers.embedded.arch_sd import sd_arch

    arch = sd_arch("sd15", "full")
    unet, largest = _count(lambda: UNet2DConditionModel(**unet_config))
    frozen = _count(lambda: AutoencoderKL(**arch.vae))[0] + _count(lambda: CLIPTextModel(CLIPTextConfig(**arch.text_encoder)))[0]
    trainable = unet if mode == "full" else _lora_params(unet_config)
    # ZeRO-3 loads the UNet partitioned (ds_diffusers.engine.zero_load): one layer whole at a time.
    engine_stage = 0 if procs == 1 and stage in (1, 2) else stage
    weight = 2 if bf16 else 4  # bytes of a compute-copy weight (and of a frozen one)
    bucket = weight * min(bucket_elements, trainable)
    if engine_stage == 3 and nvme_sub_group is not None:
        held = (weight * unet + 4 * trainable) / procs + weight * largest + bucket + 4 * 4 * min(nvme_sub_group, trainable)
    elif engine_stage == 3:
        held = (weight * unet + 16 * trainable) / procs + weight * largest + bucket
    elif engine_stage in (1, 2):
        # fp32: the masters are the module's own weights; bf16 keeps them beside the compute copy.
        masters = 0 if not bf16 else 4 * trainable / (1 if engine_stage == 1 else procs)
        held = weight * unet + masters + 4 * trainable * (1 if engine_stage == 1 else 1 / procs) + 8 * trainable / procs + bucket
    else:
        held = weight * unet + (4 * trainable if bf16 else 0) + 12 * trainable
    per_rank = held + weight * frozen + RUNTIME_BYTES
    if engine_stage == 3:
        # (NVMe offload is outside the estimator; its optimizer figure is then what would be on disk.)
        cpu, device, _ = estimate_zero3_model_states_mem_needs(trainable, largest, num_gpus_per_node=procs, cpu_offload=False,
                                                               cpu_offload_params=False, zero_init=True)
    else:
        cpu, device = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=procs, cpu_offload=False)
    return MemoryPlan(unet_params=unet, trainable_params=trainable, largest_layer_params=largest, frozen_params=frozen,
                      per_rank_gb=per_rank / GB, deepspeed_gb=(device + cpu / procs) / GB)
