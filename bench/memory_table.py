"""Model-state memory of the flow-matching transformers at full size: DeepSpeed's estimators beside ours.

Every count comes from the published configs built on the meta device (`ds_diffusers.embedded.
arch_flux`, `arch_sd3`, `arch_qwen_image`): transformer parameters, its largest layer, and the LoRA
adapter parameters peft adds (rank 16 by default, the trainer's default targets to_q/to_k/to_v/
to_out.0). For 1/8/16/64 GPUs (8 a node) x ZeRO-2/3 x offload x full/LoRA it lists

- DeepSpeed's estimate: `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`,
  the functions `estimate_zero{2,3}_model_states_mem_needs_all_cold` print one row of each; they see
  only the trainable parameters, so for LoRA they leave out the frozen base weights;
- our accounting of the same run in bf16 mixed precision (the docstring of `account`), which counts
  the frozen base weights, the gradient bucket and the gathered layers, no 1.5 buffer factor, and
  the host RAM of loading apart from the steady state (DeepSpeed's host figure mixes the two).

"Offload" is `offload_optimizer=cpu` for ZeRO-2 and `offload_optimizer=cpu` + `offload_param=cpu` for
ZeRO-3. Activations, the frozen text encoders and VAE (listed per model; zero with cached
embeddings and latents) and the runtime are outside both figures.

    python bench/memory_table.py                  # writes docs/memory.md's table section to stdout
    python bench/memory_table.py --write          # and into docs/memory.md between the markers
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 2**30
GPUS_PER_NODE = 8
GPU_COUNTS = (1, 8, 16, 64)
LORA_RANK = 16
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the trainer's use_lora.target_modules default
# DeepSpeed's defaults for the two buffers our accounting counts.
SETTINGS = {"reduce_bucket_size": int(5e8), "sub_group_size": int(1e9)}
DOC = REPO / "docs" / "memory.md"
BEGIN, END = "<!-- memory_table.py begin -->", "<!-- memory_table.py end -->"


@dataclass(frozen=True)
class ModelCounts:
    name: str
    params: int  # the transformer
    largest_layer: int  # parameters of its largest single module (what ZeRO-3 gathers at once)
    lora: int  # adapter parameters at LORA_RANK on LORA_TARGETS
    frozen: int  # text encoders + VAE


@dataclass(frozen=True)
class Row:
    model: str
    mode: str
    gpus: int
    stage: int
    offload: bool
    trainable: int
    ds_gpu: float  # bytes per GPU
    ds_host: float  # bytes per node
    our_gpu: float
    our_host: float
    our_load: float  # per node, while the model loads


def _transformers() -> dict[str, tuple[Callable, dict[str, int]]]:
    """name -> (build the transformer, the other models' counts); all full size."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel

    from ds_diffusers.embedded import arch_flux, arch_qwen_image, arch_sd3

    flux, medium, large = arch_flux.flux_arch("dev", "full"), arch_sd3.sd3_arch("medium", "full"), arch_sd3.sd3_arch("large", "full")
    qwen = arch_qwen_image.qwen_image_arch("full")
    others = {name: {k: v for k, v in counts().items() if k != "transformer"} for name, counts in (
        ("FLUX.1-dev", lambda: arch_flux.count_parameters("dev")),
        ("SD 3.5 Medium", lambda: arch_sd3.count_parameters("medium")),
        ("SD 3.5 Large", lambda: arch_sd3.count_parameters("large")),
        ("Qwen-Image", arch_qwen_image.count_parameters))}
    return {
        "SD 3.5 Medium": (lambda: SD3Transformer2DModel(**medium.transformer), others["SD 3.5 Medium"]),
        "SD 3.5 Large": (lambda: SD3Transformer2DModel(**large.transformer), others["SD 3.5 Large"]),
        "FLUX.1-dev": (lambda: FluxTransformer2DModel(**flux.transformer), others["FLUX.1-dev"]),
        "Qwen-Image": (lambda: QwenImageTransformer2DModel(**qwen.transformer), others["Qwen-Image"]),
    }


def count_model(name: str, build: Callable, frozen: dict[str, int], rank: int = LORA_RANK) -> ModelCounts:
    """Counts on the meta device; peft attaches the adapters to the meta model as the trainer does."""
    import torch
    from peft import LoraConfig

    with torch.device("meta"):
        model = build()
        params = sum(p.numel() for p in model.parameters())
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS)))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return ModelCounts(name, params, largest, lora, sum(frozen.values()))


def account(counts: ModelCounts, mode: str, gpus: int, stage: int, offload: bool) -> tuple[float, float, float]:
    """Our bytes (per GPU, per node in steady state, per node while loading) for bf16 mixed precision
    with Adam, read off DeepSpeed's optimizers (stage_1_and_2.py, stage3.py).

    A trainable parameter costs 2 (bf16 weight) + 2 (bf16 gradient partition) + 4 (fp32 master) + 8
    (Adam moments) bytes, and the step casts the gradient partition to fp32 (4 more): ZeRO-2 for the
    whole partition at once, ZeRO-3 one sub-group (`sub_group_size`, 1e9) at a time. ZeRO-2 keeps
    the bf16 weights whole on every GPU, ZeRO-3 partitions them and gathers one layer at a time
    (2 x largest layer: the layer and the prefetched next one). Frozen base weights (LoRA) cost 2
    bytes, replicated or partitioned like the weights. Both reduce gradients through a bf16 bucket
    (`reduce_bucket_size`, 5e8 elements). Offload keeps the fp32 master, fp32 gradient and moments
    (ZeRO-3: also the bf16 partitions) in the node's RAM, which holds its GPUs' partitions. Loading:
    ZeRO-2 ranks each load the model in fp32; ZeRO-3 loads inside `zero.Init`, rank 0 reading one
    module at a time (`engine.zero_load`; today for UNets only, see docs/memory.md).
    """
    trainable = counts.params if mode == "full" else counts.lora
    frozen = 0 if mode == "full" else counts.params
    per_node = min(gpus, GPUS_PER_NODE)
    share = trainable / gpus
    bucket = 2 * min(SETTINGS["reduce_bucket_size"], trainable)
    if stage == 2:
        load = per_node * 4 * (trainable + frozen)
        if offload:
            return 2 * (trainable + frozen) + bucket, per_node * 16 * share, load
        return 2 * (trainable + frozen) + 18 * share + bucket, 0.0, load
    load = 4 * counts.largest_layer
    weights = 2 * (trainable + frozen) / gpus
    gathered = 2 * 2 * counts.largest_layer
    if offload:
        return gathered + bucket, per_node * (weights + 16 * share), load
    step_fp32 = 4 * min(SETTINGS["sub_group_size"], share)
    return weights + 14 * share + step_fp32 + gathered + bucket, 0.0, load


def deepspeed_estimate(counts: ModelCounts, mode: str, gpus: int, stage: int, offload: bool) -> tuple[float, float]:
    """DeepSpeed's (per GPU, per node) for the trainable parameters, as `*_all_cold` prints them."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    trainable = counts.params if mode == "full" else counts.lora
    per_node, nodes = min(gpus, GPUS_PER_NODE), max(1, gpus // GPUS_PER_NODE)
    if stage == 2:
        host, gpu = estimate_zero2_model_states_mem_needs(trainable, per_node, nodes, cpu_offload=offload)
    else:
        host, gpu, _ = estimate_zero3_model_states_mem_needs(trainable, counts.largest_layer, per_node, nodes,
                                                             cpu_offload=offload, cpu_offload_params=offload, zero_init=True)
    return gpu, host


def table_rows(counts: ModelCounts) -> list[Row]:
    rows = []
    for mode in ("full", "lora"):
        for gpus in GPU_COUNTS:
            for stage in (2, 3):
                for offload in (False, True):
                    ds_gpu, ds_host = deepspeed_estimate(counts, mode, gpus, stage, offload)
                    rows.append(Row(counts.name, mode, gpus, stage, offload,
                                    counts.params if mode == "full" else counts.lora,
                                    ds_gpu, ds_host, *account(counts, mode, gpus, stage, offload)))
    return rows


def markdown(all_counts: list[ModelCounts], rows: list[Row]) -> str:
    lines = ["| model | transformer | largest layer | LoRA r16 | frozen encoders + VAE |", "|---|---:|---:|---:|---:|"]
    for c in all_counts:
        lines.append(f"| {c.name} | {c.params:,} | {c.largest_layer:,} | {c.lora:,} | {c.frozen:,} |")
    for c in all_counts:
        lines += ["", f"### {c.name}", "",
                  "| mode | GPUs | ZeRO | offload | DeepSpeed GiB/GPU | ours GiB/GPU | DeepSpeed GiB/node | ours GiB/node "
                  "| ours load GiB/node |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r.model == c.name):
            lines.append(f"| {r.mode} | {r.gpus} | {r.stage} | {'cpu' if r.offload else 'none'} | {r.ds_gpu / GB:.1f} | "
                         f"{r.our_gpu / GB:.1f} | {r.ds_host / GB:.1f} | {r.our_host / GB:.1f} | {r.our_load / GB:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"replace the table in {DOC.relative_to(REPO)}")
    parser.add_argument("--rank", type=int, default=LORA_RANK)
    args = parser.parse_args()
    all_counts = [count_model(name, build, frozen, args.rank) for name, (build, frozen) in _transformers().items()]
    text = markdown(all_counts, [row for counts in all_counts for row in table_rows(counts)])
    print(text)
    if args.write:
        doc = DOC.read_text()
        head, rest = doc.split(BEGIN, 1)
        DOC.write_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
