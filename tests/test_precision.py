"""Precision on one in-process DeepSpeed engine (a small MLP, configs from `to_deepspeed_config`):
fp32 gradient accumulation under bf16, an EMA of the fp32 masters that equals diffusers' EMAModel,
and the ZeRO-0 step's clipping, bitwise DeepSpeed's.
"""

from __future__ import annotations

import copy
import json
import math
import types

import pytest
import torch

from ds_diffusers.engine import overflow
from ds_diffusers.config import to_deepspeed_config, validate_dict
from ds_diffusers.config.checks import check_consistency
from ds_diffusers.ema import ShardedEMA, ema_decay
from ds_diffusers.errors import ConfigError
from ds_diffusers.engine import MasterWeights, local_partition

MICRO, ACCUMULATION = 8, 4


def bf16_config(**changes) -> dict:
    cfg = validate_dict({"pretrained_model_name_or_path": ".", "dataset_dir": ".", "bf16": {"enabled": True},
                         "train_micro_batch_size_per_gpu": MICRO, "scheduler": {"type": "none"},
                         "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "eps": 1.0}}, **changes})
    return to_deepspeed_config(cfg, world_size=1)


def engine_for(ds_config: dict, seed: int = 0):
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config)
    return engine


def train(engine, steps: int, micro: int, seed: int = 0, after_step=None) -> torch.Tensor:
    """`steps` optimizer steps on the same batches of MICRO * ACCUMULATION samples whatever the split."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(32, 32, generator=gen)
    for step in range(1, steps + 1):
        inputs = torch.randn(MICRO * ACCUMULATION, 32, generator=gen)
        targets = torch.tanh(inputs @ teacher)
        for start in range(0, len(inputs), micro):
            prediction = engine(inputs[start:start + micro].to(torch.bfloat16)).float()
            engine.backward((prediction - targets[start:start + micro]).pow(2).mean())
            engine.step()
        if after_step is not None:
            after_step(step)
    masters = MasterWeights(engine)
    return torch.cat([t.flatten() for t in masters.gather_full(masters.local()).values()])


@pytest.mark.slow  # about 12 s: many small bf16 and fp32 engine steps
def test_fp32_accumulation_tracks_the_big_batch_closer_than_bf16(one_rank):
    accumulated = bf16_config(gradient_accumulation_steps=ACCUMULATION)
    assert accumulated["data_types"] == {"grad_accum_dtype": "fp32"} and accumulated["zero_optimization"]["stage"] == 1
    big_batch = {**accumulated, "train_micro_batch_size_per_gpu": MICRO * ACCUMULATION, "gradient_accumulation_steps": 1}
    bf16_summed = {**copy.deepcopy(accumulated), "data_types": {"grad_accum_dtype": "bf16"}}
    # eps=1 keeps Adam near-linear, so weight differences measure gradient differences, not sign flips.
    steps = 10
    reference = train(engine_for(big_batch), steps, MICRO * ACCUMULATION)
    fp32_error = (train(engine_for(accumulated), steps, MICRO) - reference).norm()
    bf16_error = (train(engine_for(bf16_summed), steps, MICRO) - reference).norm()
    # Measured: 2.6e-5 vs 3.5e-5 (ratio 0.72-0.79 over six seeds).
    assert fp32_error < 0.9 * bf16_error, (fp32_error, bf16_error)


@pytest.mark.parametrize("decay, after", [(0.9, 0), (0.9999, 0), (0.99, 5)])
def test_decay_is_diffusers_ema_decay(decay, after):
    from diffusers.training_utils import EMAModel

    reference = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=decay, update_after_step=after)
    for step in range(0, 60):
        assert ema_decay(step, decay=decay, update_after_step=after) == reference.get_decay(step)


@pytest.mark.parametrize("stage, accumulation", [(0, 1), (1, 4), (3, 1)])
def test_ema_of_masters_equals_diffusers_ema_model(one_rank, stage, accumulation):
    from diffusers.training_utils import EMAModel

    engine = engine_for(bf16_config(gradient_accumulation_steps=accumulation, zero_optimization={"stage": stage}))
    assert engine.zero_optimization_stage() == max(stage, 1)  # 16-bit never runs stage 0
    ema = ShardedEMA(engine, decay=0.9, update_after_step=2)
    masters = MasterWeights(engine)
    reference = EMAModel([torch.nn.Parameter(t.clone()) for t in masters.gather_full(masters.local()).values()],
                         decay=0.9, update_after_step=2, foreach=False)

    def both(step):
        ema.update(step)
        reference.step([torch.nn.Parameter(t) for t in masters.gather_full(masters.local()).values()])

    train(engine, 8, MICRO * ACCUMULATION // accumulation, after_step=both)
    ours = ema.gathered(rank=0)
    assert all(t.dtype == torch.float32 for t in ours.values())
    for (name, value), expected in zip(ours.items(), reference.shadow_params):
        assert (value - expected.view(value.shape)).abs().max().item() <= 1e-6, name
    # The masters moved below bf16 resolution: an average of the 16-bit copy would differ.
    compute_copy = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()]) if stage != 3 else None
    if compute_copy is not None:
        assert (compute_copy - torch.cat([t.flatten() for t in masters.gather_full(masters.local()).values()])).abs().max() > 0


@pytest.mark.parametrize("stage", [0, 3])
def test_ema_swap_in_and_out_restores_the_compute_copy(one_rank, stage):
    engine = engine_for(bf16_config(zero_optimization={"stage": stage}))
    ema = ShardedEMA(engine, decay=0.9, update_after_step=0)
    train(engine, 3, MICRO * ACCUMULATION, after_step=ema.update)
    local = [local_partition(p) for p in engine.module.parameters()]
    before = [t.clone() for t in local]
    with ema.swapped_in():
        for tensor, shadow in zip(local, ema.shadow):
            assert torch.equal(tensor.view(-1), shadow.to(tensor.dtype).view(-1)[: tensor.numel()])
        assert any(not torch.equal(a, b) for a, b in zip(local, before))
    assert all(torch.equal(a, b) for a, b in zip(local, before))


def test_ema_under_zero3_optimizer_offload_stays_with_the_host_masters(one_rank, monkeypatch):
    """The shadow lives, and is updated and exported, where the offloaded masters are: the EMA never
    copies a partition to the accelerator (a host-to-device copy of all of them every step)."""
    from deepspeed.accelerator import get_accelerator

    engine = engine_for(bf16_config(zero_optimization={"stage": 3, "offload_optimizer": {"device": "cpu"}}))
    train(engine, 1, MICRO * ACCUMULATION)
    flats = engine.optimizer.fp32_partitioned_groups_flat
    assert engine.optimizer.offload_optimizer and all(flat.device.type == "cpu" for flat in flats)
    # On this CPU the accelerator is the host too: name it "meta" and a copy to it shows (and holds no data).
    monkeypatch.setattr(type(get_accelerator()), "current_device_name", lambda self: "meta")
    ema = ShardedEMA(engine, decay=0.9, update_after_step=0)
    ema.update(1)  # at step 1 the EMA copies the masters
    storages = {flat.untyped_storage().data_ptr() for flat in flats}
    masters = MasterWeights(engine)
    for (master, _), shadow in zip(masters.local(), ema.shadow):
        assert master.untyped_storage().data_ptr() in storages, "a master slice is a view of the optimizer's partition"
        assert shadow.device == master.device == torch.device("cpu")
    exported, expected = ema.gathered(rank=0), masters.gather_full(masters.local())
    assert exported.keys() == expected.keys() and all(torch.equal(exported[n], expected[n]) for n in expected)


def test_end_of_run_export_gathers_the_masters_once(one_rank, tmp_path, monkeypatch):
    import deepspeed
    from safetensors.torch import load_file

    from ds_diffusers import train as train_module
    from ds_diffusers.export import EMA_DIR, UNET_DIR, UNET_WEIGHTS
    from tests.helpers import SINGLE

    class Exportable(torch.nn.Sequential):
        def to_json_string(self) -> str:
            return "{}"

    torch.manual_seed(0)
    model = Exportable(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=bf16_config(zero_optimization={"stage": 1}))
    ema = ShardedEMA(engine, decay=0.9, update_after_step=0)
    train(engine, 3, MICRO * ACCUMULATION, after_step=ema.update)
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text("{}")
    cfg = validate_dict({"pretrained_model_name_or_path": str(base), "dataset_dir": ".", "output_dir": str(tmp_path / "out"),
                         "use_ema": True})
    gathers = []
    gather_full = MasterWeights.gather_full
    monkeypatch.setattr(MasterWeights, "gather_full", lambda self, *args, **kwargs: gathers.append(1) or gather_full(self, *args, **kwargs))
    logger = types.SimpleNamespace(message=lambda text: None, close=lambda: None)
    run = types.SimpleNamespace(cfg=cfg, dist=SINGLE, logger=logger, state=types.SimpleNamespace(global_step=3), engine=engine,
                                ema=ema, dataset=types.SimpleNamespace(bad_rows=list))
    train_module.finish(run)
    assert len(gathers) == 2, "one gather of the masters, one of the EMA"
    masters = MasterWeights(engine)
    for sub, expected in ((UNET_DIR, gather_full(masters, masters.local())), (EMA_DIR, gather_full(masters, list(zip(ema.shadow, ema.starts))))):
        written = load_file(str(tmp_path / "out" / sub / UNET_WEIGHTS))
        assert written.keys() == expected.keys() and all(torch.equal(written[n], expected[n]) for n in expected), sub


def test_validation_use_ema_and_nvme_offload_are_checked():
    base = {"pretrained_model_name_or_path": ".", "dataset_dir": "."}
    assert validate_dict({**base, "use_ema": True}).validates_with_ema
    assert not validate_dict({**base, "use_ema": True, "validation_use_ema": False}).validates_with_ema
    with pytest.raises(ConfigError, match="validation_use_ema"):
        check_consistency(validate_dict({**base, "validation_use_ema": True}))
    with pytest.raises(ConfigError, match="offload_param.device.*nvme.*cpu"):
        check_consistency(validate_dict({**base, "use_ema": True, "zero_optimization": {
            "stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}}))
    check_consistency(validate_dict({**base, "use_ema": True, "zero_optimization": {  # cpu offload works
        "stage": 3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}}))


def test_plain_optimizer_clips_exactly_as_deepspeed_in_one_pass(one_rank):
    from deepspeed.runtime.utils import clip_grad_norm_

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n)) for n in (5, 300, 7)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for mine, reference in zip(ours, theirs):
        mine.grad = 3 * torch.randn_like(mine)
        reference.grad = mine.grad.clone()
    engine = types.SimpleNamespace(optimizer=torch.optim.SGD(ours, lr=0.1), gradient_clipping=lambda: 1.0)
    overflow.skip_nonfinite_steps(engine)
    engine.clip_fp32_gradients()
    clip_grad_norm_(theirs, 1.0)
    assert all(torch.equal(mine.grad, reference.grad) for mine, reference in zip(ours, theirs))
    assert overflow.grad_norm([p.grad for p in ours]).item() == pytest.approx(1.0, rel=1e-5)
    ours[1].grad[4] = math.inf  # a non-finite gradient survives clipping as nan and skips the step
    engine.clip_fp32_gradients()
    engine.optimizer.step()
    assert engine.optimizer.overflow and not engine.optimizer.state


@pytest.mark.parametrize("bf16, init, base_dtype", [(True, True, torch.bfloat16), (False, True, torch.float32),
                                                    (True, "pissa", torch.float32)])
def test_a_lora_runs_frozen_base_is_loaded_in_the_weight_dtype(tiny_assets, bf16, init, base_dtype):
    """No fp32 copy of a 16-bit LoRA run's frozen base per process (FLUX.1: 47.6 GB instead of 23.8);
    PiSSA's start is computed from the base weights, so it still reads them in fp32. Adapters are fp32."""
    from ds_diffusers.config import load_config
    from ds_diffusers.models import build_unet
    from tests.helpers import REPO

    cfg = load_config(REPO / "cfg/default.json", [f"pretrained_model_name_or_path={tiny_assets.model_dir}",
                                                  "use_lora.action=true", "use_lora.rank=4", f"use_lora.init={json.dumps(init)}",
                                                  f"bf16.enabled={str(bf16).lower()}"])
    unet = build_unet(cfg)
    frozen = {param.dtype for param in unet.parameters() if not param.requires_grad}
    trainable = {param.dtype for param in unet.parameters() if param.requires_grad}
    assert frozen == {base_dtype} and trainable == {torch.float32}
