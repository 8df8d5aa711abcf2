"""Memory the SDXL presets need for model states, from DeepSpeed's own estimators, on the full-size
SDXL architecture built on the meta device (no weights, no GPU): `python bench/sdxl_memory.py`.

DeepSpeed's `*_all_live(model)` helpers de-duplicate parameters by `data_ptr()`, which is 0 for
every meta tensor, so the counts are taken here and passed to the estimators those helpers call.
Activations are not model states and are not included (they depend on batch size, resolution and
gradient checkpointing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as `python bench/sdxl_memory.py` from anywhere

from ds_diffusers.embedded.arch_sdxl import SDXL_BASE_UNET  # noqa: E402
GIB = 2**30


def frozen_params() -> int:
    """CLIP ViT-L/14 text tower, OpenCLIP bigG/14 text tower with projection, the SDXL VAE."""
    common = {"vocab_size": 49408, "max_position_embeddings": 77}
    first = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                         projection_dim=768, hidden_act="quick_gelu", **common))
    second = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                       num_attention_heads=20, projection_dim=1280, hidden_act="gelu", **common))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
    return sum(p.numel() for model in (first, second, vae) for p in model.parameters())


def lora_params(unet: torch.nn.Module, rank: int, targets: list[str]) -> int:
    """What peft adds: rank x (in + out) for every targeted Linear."""
    return sum(rank * (module.in_features + module.out_features) for name, module in unet.named_modules()
               if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
        frozen = frozen_params()
    total = sum(p.numel() for p in unet.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in unet.modules())
    lora_cfg = json.loads((REPO / "cfg" / "sdxl_lora.json").read_text())["use_lora"]
    lora = lora_params(unet, lora_cfg["rank"], lora_cfg["target_modules"])
    print(f"SDXL UNet {total:,} parameters (largest layer {largest:,}); frozen encoders + VAE {frozen:,}; "
          f"LoRA rank {lora_cfg['rank']} adds {lora:,}")
    rows = []
    for gpus in args.gpus:
        # ZeRO-2: every process loads the fp32 UNet on the host before DeepSpeed casts and moves it,
        # the ZeRO-2 estimator's host figure.
        full_cpu, full_gpu = estimate_zero2_model_states_mem_needs(total, gpus, 1, cpu_offload=False)
        # sdxl_lora.json: ZeRO-2 over the adapters; the frozen UNet, encoders and VAE sit in bf16 on every GPU.
        _, lora_gpu = estimate_zero2_model_states_mem_needs(lora, gpus, 1, cpu_offload=False)
        rows.append(("sdxl_lora (ZeRO-2, LoRA, bf16)", gpus, 2 * (total + frozen) + lora_gpu, full_cpu))
        # sdxl_full.json: ZeRO-3 with the optimizer offloaded, parameters on the GPUs; encoders + VAE bf16 outside.
        # ZeRO-3 loads the UNet partitioned (ds_diffusers.engine.zero_load), the estimator's zero_init=True.
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, 1, cpu_offload=True, cpu_offload_params=False,
                                                            zero_init=True)
        rows.append(("sdxl_full (ZeRO-3, optimizer offload, bf16)", gpus, gpu + 2 * frozen, cpu))
        rows.append(("full fine-tune, ZeRO-2, no offload (for comparison)", gpus, full_gpu + 2 * frozen, full_cpu))
    print("| preset | GPUs | per GPU (GiB) | host, per node (GiB) |\n|---|---|---|---|")
    for name, gpus, gpu, cpu in rows:
        print(f"| {name} | {gpus} | {gpu / GIB:.1f} | {cpu / GIB:.1f} |")


if __name__ == "__main__":
    main()
