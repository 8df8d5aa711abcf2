"""Peak host memory of a LoRA training step on the full-size SD 3.5 Medium transformer, on a CPU.

The transformer is the published config (`embedded.arch_sd3`, 2,243,171,520 parameters) with random
weights in bf16, built on the meta device and materialised once (no fp32 copy ever exists); peft
adds rank-16 adapters on the trainer's default targets, kept in fp32 as the trainer keeps them;
AdamW steps the adapters. Prompt features and latents are random tensors of the real shapes (the
run as with `cache_text_embeddings` + `cache_latents`: the 5.7B frozen text encoders and the VAE are
not in memory), so the figure is the transformer's: weights + adapters + optimizer + activations.
The flow-matching loss is the rectified-flow one (velocity noise - latents at x_t = (1-t) x0 + t noise).

Not yet through the trainer as `bench/scale.py` does SD 1.5: the trainer learns the transformer
families in issue 19's other half. Run it alone on the machine, under a memory limit:

    prlimit --as=$((20 * 2**30)) python bench/sd35_lora_memory.py --resolution 256 --steps 2
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GB = 2**30


def rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=333, help="77 CLIP + 256 T5 tokens, as the SD 3.5 pipeline")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = parser.parse_args()

    import torch
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    from ds_diffusers.embedded.arch_sd3 import sd3_arch

    sys.path.insert(0, str(REPO / "bench"))
    from memory_table import LORA_TARGETS

    torch.manual_seed(0)
    result: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "args": {k: str(v) for k, v in vars(args).items()},
                    "torch_threads": torch.get_num_threads(), "rss_start_gb": current_rss_gb()}
    start = time.perf_counter()
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**sd3_arch("medium", "full").transformer)
    transformer = transformer.to(torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():
        for param in transformer.parameters():
            param.normal_(0.0, 0.02)
    transformer.requires_grad_(False)
    result["params"] = sum(p.numel() for p in transformer.parameters())
    result["build_s"] = time.perf_counter() - start
    result["rss_after_build_gb"] = current_rss_gb()
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(LORA_TARGETS)))
    adapters = [p for p in transformer.parameters() if p.requires_grad]
    for param in adapters:
        param.data = param.data.float()
    result["lora_params"] = sum(p.numel() for p in adapters)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(adapters, lr=1e-4)

    side = args.resolution // 8
    step_s = []
    for _ in range(args.steps):
        began = time.perf_counter()
        latents = torch.randn(1, 16, side, side, dtype=torch.bfloat16)
        noise = torch.randn_like(latents)
        sigma = torch.rand(1)
        noisy = ((1 - sigma) * latents.float() + sigma * noise.float()).to(torch.bfloat16)
        prediction = transformer(hidden_states=noisy, timestep=sigma * 1000,
                                 encoder_hidden_states=torch.randn(1, args.text_tokens, 4096, dtype=torch.bfloat16),
                                 pooled_projections=torch.randn(1, 2048, dtype=torch.bfloat16), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), (noise - latents).float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - began)
        print(f"step {len(step_s)}: loss {loss.item():.4f}, {step_s[-1]:.1f} s, peak RSS {rss_gb():.2f} GiB", flush=True)
    result.update(step_s=step_s, peak_rss_gb=rss_gb(), finite_loss=bool(torch.isfinite(loss)))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
