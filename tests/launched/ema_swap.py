"""The EMA swapped in for validation, on 2 ranks (started by tests/test_precision_integration.py through
DeepSpeed's launcher; a failed check exits non-zero with its message).

ZeRO-3: every parameter computes with the EMA inside `swapped_in`, also the small "persistent" ones
ZeRO-3 keeps gathered between steps, and every one is back bit for bit after it.
ZeRO-2: the swap assembles one parameter at a time (its peak allocation is a few full fp32
parameters, not the model) and rebuilds the compute copy bit for bit from the masters.
"""

from __future__ import annotations

import torch

from ds_diffusers.config import to_deepspeed_config, validate_dict
from ds_diffusers.distributed import shutdown_distributed
from ds_diffusers.ema import ShardedEMA
from ds_diffusers.engine import gathered
from tests.helpers import AllocationMeter

WIDTH, LAYERS, MICRO, STEPS = 64, 6, 4, 3
PERSISTENCE_THRESHOLD = WIDTH  # the biases stay gathered between steps, the weights are partitioned


def engine_for(stage: int):
    import deepspeed

    cfg = validate_dict({"pretrained_model_name_or_path": ".", "dataset_dir": ".", "bf16": {"enabled": True},
                         "train_micro_batch_size_per_gpu": MICRO, "scheduler": {"type": "none"},
                         "zero_optimization": {"stage": stage},
                         "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}}})
    config = to_deepspeed_config(cfg, world_size=2)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = PERSISTENCE_THRESHOLD
    torch.manual_seed(0)
    layers = [module for _ in range(LAYERS) for module in (torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU())]
    model = torch.nn.Sequential(*layers)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    return engine


def trained_with_ema(stage: int):
    engine = engine_for(stage)
    ema = ShardedEMA(engine, decay=0.5, update_after_step=0)
    gen = torch.Generator().manual_seed(torch.distributed.get_rank())
    for step in range(1, STEPS + 1):
        inputs = torch.randn(MICRO, WIDTH, generator=gen).to(torch.bfloat16)
        engine.backward(engine(inputs).float().pow(2).mean())
        engine.step()
        ema.update(step)
    return engine, ema


def full_values(engine) -> dict[str, torch.Tensor]:
    """All ranks. Every parameter's full value as the module computes with it: the ones ZeRO-3 keeps
    gathered as they are (a gather would re-partition them on exit, refreshing them from the
    partitions, which the forward pass never does), the others gathered."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    values = {}
    for name, param in engine.module.named_parameters():
        if getattr(param, "ds_status", None) == ZeroParamStatus.AVAILABLE:
            values[name] = param.data.detach().clone()
            continue
        with gathered([param]):
            values[name] = param.data.detach().clone()
    return values


def check_zero3() -> None:
    engine, ema = trained_with_ema(3)
    params = dict(engine.module.named_parameters())
    assert {p.ds_persist for p in params.values()} == {True, False}, "both kinds of ZeRO-3 parameter are in the test"
    ema_full = ema.gathered(torch.distributed.get_rank())  # rank 0
    live = full_values(engine)
    with ema.swapped_in():
        inside = full_values(engine)
    after = full_values(engine)
    if torch.distributed.get_rank() == 0:
        for name, param in params.items():
            expected = ema_full[name].to(param.dtype)
            assert not torch.equal(expected, live[name]), f"{name}: the EMA differs from the weights"
            assert torch.equal(inside[name], expected), f"{name} (persistent: {param.ds_persist}) computes without its EMA"
            assert torch.equal(after[name], live[name]), f"{name} (persistent: {param.ds_persist}) not restored"


def check_zero2() -> None:
    engine, ema = trained_with_ema(2)
    assert ema.masters.fragmented, "ZeRO-2 over 2 ranks splits the masters into fragments"
    params = dict(engine.module.named_parameters())
    before = {name: p.data.clone() for name, p in params.items()}
    largest = max(p.numel() for p in params.values()) * 4
    model_bytes = sum(p.numel() for p in params.values()) * 4
    with AllocationMeter() as meter:
        with ema.swapped_in():
            pass
    # Assembling one fp32 parameter at a time; the whole EMA (or a clone of the compute copy) is far more.
    assert meter.peak <= 2 * largest < model_bytes / 2, (meter.peak, largest, model_bytes)
    assert all(torch.equal(p.data, before[name]) for name, p in params.items()), "compute copy not restored"
    ema_full = ema.gathered(torch.distributed.get_rank())
    with ema.swapped_in():
        inside = {name: p.data.clone() for name, p in params.items()}
    if torch.distributed.get_rank() == 0:
        for name, param in params.items():
            assert torch.equal(inside[name], ema_full[name].to(param.dtype)), f"{name} computes without its EMA"
            assert not torch.equal(inside[name], before[name]), f"{name}: the EMA differs from the weights"
    assert all(torch.equal(p.data, before[name]) for name, p in params.items()), "compute copy not restored"


def main() -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    check_zero3()
    check_zero2()
    print(f"rank {torch.distributed.get_rank()}: ema swap checks passed", flush=True)
    # As the entrypoints end: the group torn down after every rank is done, not in the interpreter's exit,
    # where gloo's threads of a rank whose peer has already gone can abort it ("terminate called ...").
    shutdown_distributed()


if __name__ == "__main__":
    main()
