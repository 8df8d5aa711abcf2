"""The 16-bit tier: DeepSpeed's real fp16 and bf16 optimizer paths, run on the CPU.

DeepSpeed's CPU accelerator refuses fp16 (`is_fp16_supported` is false without oneDNN fp16), so
no other CPU test ever ran the fp16 loss scaler. torch computes fp16 on the CPU (slowly); the
`fp16_on_cpu` fixture lets the accelerator say so, and the engines below are the ones our configs
build (`to_deepspeed_config`), on a small MLP, at every configured stage. They check:
- every configuration of ours reaches an optimizer that scales the loss (a `ZeROOptimizer`), and its
  updates match an fp32 reference: DeepSpeed's stage-0 wrappers divide the gradients by a loss
  scale that `engine.backward` never applied, which makes every update 2**16 times too small;
- the dynamic loss scale backs off on an overflow (the step is skipped) and rises again;
- the fp32 masters start from the fp32 weights, not from their 16-bit rounding;
- LoRA adapters on a UNet built partitioned by ZeRO-3 get a dynamic loss scale under fp16.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ds_diffusers.config import to_deepspeed_config, validate_dict
from ds_diffusers.engine import engine_zero_stage
from ds_diffusers.engine import MasterWeights, StartingValues
from ds_diffusers.models import DTYPES, build_unet, cast_trainable_like_partitioned

MICRO, STEPS, LR = 8, 4, 0.05
DTYPE_KEYS = {"fp16": {"use_fp16": {"enabled": True}}, "bf16": {"bf16": {"enabled": True}}}


@pytest.fixture(scope="module")
def fp16_on_cpu():
    """DeepSpeed's CPU accelerator reports fp16 support (torch has the kernels) for this module."""
    from deepspeed.accelerator import get_accelerator

    accelerator_class = type(get_accelerator())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accelerator_class, "is_fp16_supported", lambda self: True)
        patch.setattr(accelerator_class, "supported_dtypes", lambda self: [torch.float32, torch.bfloat16, torch.float16])
        yield


def config(precision: str, stage: int, accumulation: int = 1, **changes) -> dict:
    cfg = validate_dict({"pretrained_model_name_or_path": ".", "dataset_dir": ".", "train_micro_batch_size_per_gpu": MICRO,
                         "gradient_accumulation_steps": accumulation, "scheduler": {"type": "none"},
                         "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
                         "optimizer": {"type": "SGD", "params": {"lr": LR}}, **DTYPE_KEYS.get(precision, {}), **changes})
    return to_deepspeed_config(cfg, world_size=1)


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))


def engine_for(ds_config: dict, model: torch.nn.Module):
    import deepspeed

    starting = StartingValues.capture(model, None)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config)
    starting.write_into(engine)
    return engine


def batches(steps: int, accumulation: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(32, 32, generator=gen)
    for _ in range(steps):
        inputs = torch.randn(MICRO * accumulation, 32, generator=gen)
        yield inputs, torch.tanh(inputs @ teacher)


def masters_flat(engine) -> torch.Tensor:
    masters = MasterWeights(engine)
    return torch.cat([t.flatten() for t in masters.gather_full(masters.local()).values()])


def train_engine(engine, steps: int, accumulation: int, dtype: torch.dtype, poison_step: int | None = None) -> None:
    for step, (inputs, targets) in enumerate(batches(steps, accumulation)):
        for start in range(0, len(inputs), MICRO):
            loss = (engine(inputs[start:start + MICRO].to(dtype)).float() - targets[start:start + MICRO]).pow(2).mean()
            if step == poison_step:
                loss = loss * math.inf  # an overflow in the backward pass, as an fp16 overflow would make
            engine.backward(loss)
            engine.step()


def reference_displacement(steps: int, accumulation: int) -> torch.Tensor:
    """What plain fp32 SGD on the whole (accumulated) batch moves the weights by."""
    model = mlp()
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for inputs, targets in batches(steps, accumulation):
        optimizer.zero_grad()
        (model(inputs) - targets).pow(2).mean().backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - start


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_sixteen_bit_runs_never_take_stage_0(precision):
    for stage, world_size, offload, accumulation in itertools.product((0, 1, 2, 3), (1, 2, 8), ("none", "cpu"), (1, 4)):
        if offload == "cpu" and stage == 0:
            continue  # refused by the config checks: optimizer offload needs ZeRO >= 1
        cfg = validate_dict({"pretrained_model_name_or_path": ".", "dataset_dir": ".", **DTYPE_KEYS[precision],
                             "gradient_accumulation_steps": accumulation,
                             "zero_optimization": {"stage": stage, "offload_optimizer": {"device": offload}}})
        assert engine_zero_stage(cfg, world_size) >= 1, (stage, world_size, offload, accumulation)


@pytest.mark.parametrize("precision, stage, accumulation", [
    *itertools.product(["fp16", "bf16"], [0, 1, 2, 3], [1]), ("fp16", 2, 2), ("bf16", 1, 2), ("fp32", 2, 1),
])
def test_updates_match_fp32_sgd(one_rank, fp16_on_cpu, precision, stage, accumulation):
    """SGD's update is proportional to the gradient, so a loss scale that is divided out but never
    applied shows as a 2**16 times smaller update (relative error 1.0).

    Tolerance 2e-2 on the relative error of the displacement: fp16 rounds each weight and activation
    to 11 significant bits (relative 2**-11 = 4.9e-4; bf16 2**-8 = 3.9e-3) and a step of this MLP
    chains about ten rounded operations; measured 1e-3 (fp16) and 6e-3 (bf16)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    ds_config = config(precision, stage, accumulation)
    engine = engine_for(ds_config, mlp())
    if precision != "fp32":
        assert isinstance(engine.optimizer, ZeROOptimizer), type(engine.optimizer).__name__
    if precision == "fp16":
        assert engine.optimizer.loss_scaler.dynamic and engine.optimizer.loss_scale == 2.0 ** 16
    start = masters_flat(engine)
    train_engine(engine, STEPS, accumulation, DTYPES[{"fp16": "float16", "bf16": "bfloat16"}.get(precision, "float32")])
    displacement = masters_flat(engine) - start
    expected = reference_displacement(STEPS, accumulation)
    relative_error = ((displacement - expected).norm() / expected.norm()).item()
    assert relative_error < 2e-2, (type(engine.optimizer).__name__, relative_error)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_loss_scale_backs_off_on_overflow_and_rises_again(one_rank, fp16_on_cpu, stage):
    fp16 = {"use_fp16": {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 2, "hysteresis": 1}}
    engine = engine_for(config("none", stage, **fp16), mlp())
    scale = engine.optimizer.loss_scale
    assert scale == 2.0 ** 8
    train_engine(engine, 1, 1, torch.float16)
    before = masters_flat(engine)
    train_engine(engine, 1, 1, torch.float16, poison_step=0)
    assert engine.optimizer.loss_scale == scale / 2, "the scale must back off on an overflow"
    assert engine.skipped_steps == 1 and torch.equal(masters_flat(engine), before), "the overflowing step must be skipped"
    # DeepSpeed's DynamicLossScaler counts the stable interval from the step after the overflow:
    # the scale doubles on the (loss_scale_window + 1)-th clean step.
    train_engine(engine, 2, 1, torch.float16)
    assert engine.optimizer.loss_scale == scale / 2
    train_engine(engine, 1, 1, torch.float16)
    assert engine.optimizer.loss_scale == scale, "after loss_scale_window clean steps the scale rises again"
    assert not torch.equal(masters_flat(engine), before)


@pytest.mark.parametrize("precision, stage", [("bf16", 1), ("bf16", 2), ("bf16", 3), ("fp16", 1), ("fp16", 3)])
def test_masters_start_from_the_fp32_weights(one_rank, fp16_on_cpu, precision, stage):
    model = mlp()
    fp32 = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    engine = engine_for(config(precision, stage), model)
    assert torch.equal(masters_flat(engine), fp32)
    compute = {name: p for name, p in engine.module.named_parameters()}
    assert all(p.dtype != torch.float32 for p in compute.values())  # and the compute copy is the 16-bit one


def test_lora_on_the_partitioned_unet_gets_a_dynamic_fp16_loss_scale(sd15_assets, one_rank, fp16_on_cpu):
    """ZeRO-3 takes its dtype, and with it the loss scaler, from the first trainable parameter; the
    engine does not cast a model built inside zero.Init, so fp32 adapters gave a static scale of 1."""
    import deepspeed

    cfg = validate_dict({"pretrained_model_name_or_path": str(sd15_assets.model_dir), "dataset_dir": ".",
                         "use_fp16": {"enabled": True}, "zero_optimization": {"stage": 3},
                         "use_lora": {"action": True, "rank": 4, "alpha": 4}, "train_micro_batch_size_per_gpu": 1})
    ds_config = to_deepspeed_config(cfg, world_size=1)
    unet = build_unet(cfg, ds_config)
    assert all(hasattr(p, "ds_id") for p in unet.parameters() if not p.requires_grad), "the base must load partitioned"
    adapters = {name: p.detach().clone() for name, p in unet.named_parameters() if p.requires_grad}
    starting = StartingValues.capture(unet, None)
    cast_trainable_like_partitioned(unet, torch.float16)
    engine, *_ = deepspeed.initialize(model=unet, model_parameters=[p for p in unet.parameters() if p.requires_grad],
                                      config=ds_config)
    starting.write_into(engine)
    assert engine.optimizer.loss_scaler.dynamic and engine.optimizer.loss_scale == 2.0 ** 16
    masters = MasterWeights(engine)
    written = masters.gather_full(masters.local())
    assert written.keys() == adapters.keys()
    assert all(torch.equal(written[name], adapters[name]) for name in adapters), "adapter masters must be the fp32 init"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_run_with_lr_0_exports_the_base_unet_exactly(sd15_assets, tmp_path, stage):
    """The whole entrypoint, one process, on the SD 1.5-shaped model: with an lr below fp32's smallest
    number (every update rounds to exactly 0; lr 0 itself is refused) and no weight decay,
    two bf16 steps leave the fp32 masters as they started, so the fp32 export must equal the base
    UNet bit for bit (it differed on every weight when the masters started from bf16 values)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    overrides = [f"pretrained_model_name_or_path={sd15_assets.model_dir}", f"dataset_dir={sd15_assets.dataset_dir}",
                 f"output_dir={tmp_path / 'model'}", f"checkpoint_dir={tmp_path / 'checkpoints'}", "bf16.enabled=true",
                 f"zero_optimization.stage={stage}", "optimizer.params.lr=1e-50", "optimizer.params.weight_decay=0",
                 "max_train_steps=2", "validation_steps=0", "resolution=32", "train_micro_batch_size_per_gpu=2",
                 "lr_warmup_steps=0", "dataloader_num_workers=0"]
    repo = Path(__file__).resolve().parents[1]
    # Not this module's in-process group's rendezvous: its port is still bound (EADDRINUSE).
    rendezvous = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
    env = {**{k: v for k, v in os.environ.items() if k not in rendezvous}, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "ds_diffusers.train", "--cfg", "cfg/default.json", "--set", *overrides],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"ZeRO-{stage}" in result.stdout + result.stderr and "bfloat16" in result.stdout + result.stderr
    base = load_file(str(sd15_assets.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    exported = load_file(str(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert exported.keys() == base.keys()
    differing = [name for name in base if not torch.equal(exported[name], base[name].float())]
    assert not differing, f"{len(differing)} of {len(base)} tensors differ from the base UNet, e.g. {differing[:3]}"
