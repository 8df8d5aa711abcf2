"""Resuming on another topology through DeepSpeed's launcher: 2 -> 1 and 1 -> 2 processes
(full UNet with EMA, ZeRO-2 configured, which one process runs as stage 0) and ZeRO-2 -> ZeRO-3
(LoRA), on the tiny model.

Each conversion is checked exactly where exactness is possible: a resume that trains no step and
saves at once must hold the saved step's state bit for bit (weights, EMA, Adam moments and step),
whatever layout wrote it. Training on is checked against a same-topology resume of the same step:
the sample ids each micro-batch reads, the losses, and the exported weights within the bound below.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ds_diffusers.checkpoint import damaged_file
from tests.fault_injection import injected
from tests.helpers import RESUME_COMMON, assert_ok, launch, losses, max_diff, run_cfg, tensors

pytestmark = pytest.mark.multiprocess

LR, BETA1, BETA2, WEIGHT_DECAY = 1e-3, 0.9, 0.999, 0.01  # cfg/default.json's AdamW (constant after 2 warm-up steps)
UNET = Path("unet") / "diffusion_pytorch_model.safetensors"
EMA = Path("unet_ema") / "diffusion_pytorch_model.safetensors"


def adam_step_bound(t: int) -> float:
    """The most one bias-corrected Adam step t can move an element, over lr: |m_hat / sqrt(v_hat)| <=
    (1 - b1) / (1 - b1^t) * sqrt((1 - b2^t) / (1 - b2)) * sqrt(1 / (1 - b1^2 / b2)), by Cauchy-Schwarz
    on m = (1 - b1) sum b1^i g_i against v = (1 - b2) sum b2^i g_i^2 (whatever the gradients are)."""
    return (1 - BETA1) / (1 - BETA1**t) * math.sqrt((1 - BETA2**t) / (1 - BETA2)) / math.sqrt(1 - BETA1**2 / BETA2)


def divergence_bound(first_step: int, last_step: int, largest_weight: float) -> float:
    """How far two runs that start from the same state at `first_step - 1` can be apart after
    `last_step`, whatever batches and noise each draws: each moves every element by at most
    lr * (adam_step_bound(t) + weight_decay * |w|) per step."""
    per_run = sum(LR * (adam_step_bound(t) + WEIGHT_DECAY * largest_weight) for t in range(first_step, last_step + 1))
    return 2 * per_run


def run(tiny_assets, out: Path, procs: int, *overrides: str, record: bool = False) -> str:
    args = run_cfg(tiny_assets, out, *RESUME_COMMON, *overrides)
    if record:
        (out / "samples").mkdir(parents=True)
        with injected("record_samples:0"):
            result = launch(args, procs=procs, env={"DSD_RECORD_DIR": str(out / "samples")})
    else:
        result = launch(args, procs=procs)
    assert_ok(result)
    return result.stdout + result.stderr


def samples_per_step(out: Path, procs: int, micro_batches_per_step: int) -> list[list[int]]:
    """The sample ids of each optimizer step, over all ranks, sorted."""
    per_rank = [[json.loads(line)["ids"] for line in (out / "samples" / f"rank_{rank}.jsonl").read_text().splitlines()]
                for rank in range(procs)]
    steps = []
    for start in range(0, len(per_rank[0]), micro_batches_per_step):
        steps.append(sorted(i for rank in per_rank for batch in rank[start:start + micro_batches_per_step] for i in batch))
    return steps


def universal_state(step_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """Every trainable parameter's fp32 value, Adam moments and step from a step folder of any layout."""
    from ds_diffusers.checkpoint_reader import read_meta
    from ds_diffusers.config import validate_dict
    from ds_diffusers.engine.universal import read_universal_param, write_universal
    from ds_diffusers.models import build_unet, param_groups

    meta = read_meta(step_dir)
    cfg = validate_dict({**meta["training_config"], "pretrained_model_name_or_path": meta["pretrained_model_name_or_path"],
                         "dataset_dir": "."})
    unet = build_unet(cfg)
    name_of = {id(p): name for name, p in unet.named_parameters()}
    order = [name_of[id(p)] for group in param_groups(unet, cfg) for p in group["params"]]
    universal = write_universal(step_dir, out, order, cfg.gradient_clipping)
    # flattened: DeepSpeed's ZeRO-3 converter saves flat tensors (both universal loaders take either)
    return {f"{name}/{key}": torch.as_tensor(read_universal_param(universal, name, key)).float().reshape(-1)
            for name in order for key in ("fp32", "exp_avg", "exp_avg_sq", "step")}


def assert_carried_exactly(saved_step: Path, resaved_step: Path, work: Path) -> dict[str, torch.Tensor]:
    """The step re-saved on the new topology holds the saved step's weights, Adam moments and step
    bit for bit, and the Adam state is really there (not zeros on both sides); returns the saved one."""
    before, after = universal_state(saved_step, work / "before"), universal_state(resaved_step, work / "after")
    assert max_diff(before, after) == 0.0
    assert max(t.abs().max() for k, t in before.items() if k.endswith("exp_avg_sq")) > 0
    return before


def test_full_ema_resumes_2_to_1_exactly_and_1_to_2_trains_on(tiny_assets, tmp_path):
    full = ("zero_optimization.stage=2", "use_ema=true", "ema_decay=0.9")
    saved, moved, same, grown = (tmp_path / name for name in ("saved", "moved", "same", "grown"))
    run(tiny_assets, saved, 2, *full, "max_train_steps=2", record=True)
    step_2 = saved / "checkpoints" / "step_2"
    # 2 -> 1, no step trained: the 1-process save holds the 2-process step's state bit for bit
    output = run(tiny_assets, moved, 1, *full, "max_train_steps=2", f"resume_from_checkpoint={step_2}")
    assert "global batch 16 kept on 1 process(es): gradient_accumulation_steps 1 -> 2" in output
    assert "(converted: 2 processes, ZeRO-2 -> 1 process, ZeRO-2)" in output
    for export in (UNET, EMA):
        assert max_diff(tensors(moved / "model" / export), tensors(saved / "model" / export)) == 0.0, export
    before, after = universal_state(step_2, tmp_path / "u2"), universal_state(moved / "checkpoints" / "step_2", tmp_path / "u1")
    assert max_diff(before, after) == 0.0 and before["conv_in.weight/exp_avg_sq"].abs().max() > 0  # Adam state carried
    assert not (moved / "checkpoints" / ".universal").exists()  # the conversion is removed
    assert damaged_file(step_2) is None  # the saved step was only read: every recorded digest still holds
    # 1 -> 2 from that 1-process step, against a 2-process resume of the 2-process step: same samples per step
    run(tiny_assets, same, 2, *full, "max_train_steps=4", f"resume_from_checkpoint={step_2}", record=True)
    output = run(tiny_assets, grown, 2, *full, "max_train_steps=4",
                 f"resume_from_checkpoint={moved / 'checkpoints' / 'step_2'}", record=True)
    assert "global batch 16 kept" not in output  # the 1-process checkpoint asked for accumulation 1 on 2 processes
    seen_before = samples_per_step(saved, 2, 1)
    assert samples_per_step(grown, 2, 1) == samples_per_step(same, 2, 1)
    seen = [i for step in seen_before + samples_per_step(grown, 2, 1) for i in step]
    assert len(seen) == len(set(seen)) == 4 * 16  # no sample of the epoch twice, none skipped
    # losses go on from where they were; weights within what two steps from one state can differ by
    assert all(abs(a - b) <= 0.25 * b for a, b in zip(losses(grown / "model"), losses(same / "model")))
    weights = tensors(same / "model" / UNET)
    bound = divergence_bound(3, 4, max(t.abs().max().item() for t in weights.values()))
    assert max_diff(tensors(grown / "model" / UNET), weights) <= bound
    assert max_diff(tensors(grown / "model" / EMA), tensors(same / "model" / EMA)) <= bound


def test_lora_resumes_zero2_to_zero3_exactly(tiny_assets, tmp_path):
    lora = ("use_lora.action=true", "optimizer.params.lr=0.01")
    saved, staged = tmp_path / "saved", tmp_path / "staged"
    run(tiny_assets, saved, 2, *lora, "zero_optimization.stage=2", "max_train_steps=2")
    step_2 = saved / "checkpoints" / "step_2"
    output = run(tiny_assets, staged, 2, *lora, "zero_optimization.stage=3", "max_train_steps=2",
                 f"resume_from_checkpoint={step_2}")
    assert "ZeRO-3" in output
    adapters = tensors(saved / "model" / "pytorch_lora_weights.safetensors")
    assert max_diff(tensors(staged / "model" / "pytorch_lora_weights.safetensors"), adapters) == 0.0
    before = assert_carried_exactly(step_2, staged / "checkpoints" / "step_2", tmp_path)
    assert any("lora" in name for name in before)


def test_sd15_full_ema_resumes_zero2_on_2_as_zero3_on_1_exactly(sd15_assets, tmp_path):
    """The SD 1.5-shaped UNet: process count and stage change at once (ZeRO-3 on one process keeps
    its stage and pads the partitions, which the EMA cut must skip)."""
    from ds_diffusers.embedded.arch_sd import TEST_RESOLUTION

    full = (f"resolution={TEST_RESOLUTION}", "train_micro_batch_size_per_gpu=4", "use_ema=true", "ema_decay=0.9")
    saved, moved = tmp_path / "saved", tmp_path / "moved"
    run(sd15_assets, saved, 2, *full, "zero_optimization.stage=2", "max_train_steps=1")
    output = run(sd15_assets, moved, 1, *full, "zero_optimization.stage=3", "max_train_steps=1",
                 f"resume_from_checkpoint={saved / 'checkpoints' / 'step_1'}")
    assert "gradient_accumulation_steps 1 -> 2" in output
    for export in (UNET, EMA):
        assert max_diff(tensors(moved / "model" / export), tensors(saved / "model" / export)) == 0.0, export


def test_sd15_lora_resumes_on_1_as_zero3_on_2_exactly(sd15_assets, tmp_path):
    """The SD 1.5-shaped UNet with LoRA: one process (fp32 ZeRO-2 runs as stage 0, whose files our
    own universal writer converts) resumed on two under ZeRO-3, accumulation halved."""
    from ds_diffusers.embedded.arch_sd import TEST_RESOLUTION

    lora = (f"resolution={TEST_RESOLUTION}", "train_micro_batch_size_per_gpu=2", "gradient_accumulation_steps=2",
            "use_lora.action=true", "optimizer.params.lr=0.01")
    saved, moved = tmp_path / "saved", tmp_path / "moved"
    run(sd15_assets, saved, 1, *lora, "zero_optimization.stage=2", "max_train_steps=1")
    step_1 = saved / "checkpoints" / "step_1"
    output = run(sd15_assets, moved, 2, *lora, "zero_optimization.stage=3", "max_train_steps=1",
                 f"resume_from_checkpoint={step_1}")
    assert "global batch 4 kept on 2 process(es): gradient_accumulation_steps 2 -> 1" in output
    assert "(converted: 1 process" in output and "ZeRO-3)" in output
    adapters = tensors(saved / "model" / "pytorch_lora_weights.safetensors")
    assert max_diff(tensors(moved / "model" / "pytorch_lora_weights.safetensors"), adapters) == 0.0
    before = assert_carried_exactly(step_1, moved / "checkpoints" / "step_1", tmp_path)
    assert all("lora" in name for name in before)
