"""Translation of a validated config into the DeepSpeed dict, per ZeRO stage and precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ds_diffusers.config import to_deepspeed_config, validate_dict
from tests.helpers import with_changes


def translate(world_size=2, accelerator="cpu", **changes):
    changes.setdefault("use_fp16", {"enabled": False})
    cfg = validate_dict(with_changes(**changes))
    return to_deepspeed_config(cfg, world_size=world_size, accelerator_name=accelerator)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_stage_and_precision(stage, precision):
    changes = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 5}
    if precision == "fp16":
        changes["use_fp16"] = {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 200, "hysteresis": 3,
                               "consecutive_hysteresis": True, "min_loss_scale": 0.5}
    if precision == "bf16":
        changes["bf16"] = {"enabled": True}
    ds = translate(world_size=4, **changes)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 4
    # 16-bit weights with accumulation sum in fp32, which DeepSpeed does from stage 1 on.
    assert ds["zero_optimization"] == {"stage": max(stage, 1) if precision != "fp32" else stage}
    assert ds.get("data_types") == ({"grad_accum_dtype": "fp32"} if precision != "fp32" else None)
    if precision == "fp16":
        assert ds["fp16"] == {"enabled": True, "auto_cast": False, "loss_scale": 0.0, "initial_scale_power": 12,
                              "loss_scale_window": 200, "hysteresis": 3, "consecutive_hysteresis": True, "min_loss_scale": 0.5}
        assert "bf16" not in ds
    elif precision == "bf16":
        assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    else:
        assert "fp16" not in ds and "bf16" not in ds


def test_offload_blocks_and_auto_means_none():
    ds = translate(zero_optimization={"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                                      "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}, "overlap_comm": True})
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "nvme", "pin_memory": False, "nvme_path": "/nvme"}
    assert ds["zero_optimization"]["overlap_comm"] is True
    auto = translate(zero_optimization={"stage": 1, "offload_param": {"device": "auto"}, "offload_optimizer": {"device": "auto"}})
    assert auto["zero_optimization"] == {"stage": 1}


def test_optimizer_passthrough_and_cpu_torch_adam():
    ds = translate()
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["lr"] == 1e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.01
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in translate(accelerator="cuda")["optimizer"]["params"]
    offloaded = translate(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
    assert "torch_adam" not in offloaded["optimizer"]["params"]  # DeepSpeedCPUAdam is the point of offload


def test_no_deepspeed_scheduler_block():
    # The schedule is a LambdaLR passed to deepspeed.initialize (tests/test_schedules.py).
    assert "scheduler" not in translate()
    assert "scheduler" not in translate(scheduler={"type": "cosine", "params": {}})


def test_monitors_profiler_and_clipping_pass_through():
    ds = translate(gradient_clipping=1.5, wall_clock_breakdown=True, output_dir="out",
                   flops_profiler={"enabled": True, "profile_step": 3},
                   tensorboard={"enabled": True}, csv_monitor={"enabled": True, "output_path": "logs/csv", "job_name": "j"})
    assert ds["gradient_clipping"] == 1.5 and ds["wall_clock_breakdown"] is True
    assert ds["flops_profiler"]["profile_step"] == 3 and ds["flops_profiler"]["enabled"] is True
    assert ds["tensorboard"] == {"enabled": True, "output_path": "out/logs/tensorboard", "job_name": "ds-diffusers"}
    assert ds["csv_monitor"] == {"enabled": True, "output_path": "logs/csv", "job_name": "j"}
    assert "flops_profiler" not in translate()


@pytest.mark.parametrize("stage, world_size, offload, engine_stage", [
    (1, 1, "none", 0), (2, 1, "none", 0),  # one rank: nothing to partition, stage 0 makes the same update
    (2, 1, "cpu", 2),  # optimizer offload needs ZeRO >= 1
    (3, 1, "none", 3), (2, 2, "none", 2), (1, 4, "none", 1), (0, 1, "none", 0),
])
def test_single_process_runs_zero_1_and_2_as_stage_0(stage, world_size, offload, engine_stage):
    ds = translate(world_size=world_size, zero_optimization={"stage": stage, "offload_optimizer": {"device": offload}})
    assert ds["zero_optimization"]["stage"] == engine_stage


@pytest.mark.parametrize("precision, accumulation, world_size, stage, engine_stage, fp32_accum", [
    ("bf16", 4, 1, 2, 1, True),  # one process keeps stage 1, not the stage-0 shortcut
    ("bf16", 4, 1, 0, 1, True),  # stage 0 rejects fp32 accumulation of bf16 weights
    ("fp16", 4, 2, 0, 1, True),
    ("bf16", 4, 2, 2, 2, True), ("bf16", 4, 2, 3, 3, True),
    ("bf16", 1, 1, 2, 1, False),  # 16-bit never runs stage 0 (tests/test_engine_16bit.py)
    ("fp16", 1, 1, 0, 1, False),
    ("fp32", 4, 1, 2, 0, False),  # fp32 weights already accumulate in fp32
])
def test_fp32_gradient_accumulation(precision, accumulation, world_size, stage, engine_stage, fp32_accum):
    changes = {"zero_optimization": {"stage": stage}, "gradient_accumulation_steps": accumulation}
    if precision == "bf16":
        changes["bf16"] = {"enabled": True}
    if precision == "fp16":
        changes["use_fp16"] = {"enabled": True}
    ds = translate(world_size=world_size, **changes)
    assert ds["zero_optimization"]["stage"] == engine_stage
    assert ("data_types" in ds) == fp32_accum
    if fp32_accum:
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"}


def test_print_deepspeed_config_prints_the_engine_config_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from ds_diffusers.train import main

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # the preset's output and checkpoint folders are relative
    assert main(["--cfg", str(repo / "cfg/sd15_lora.json"), "--print-deepspeed-config", "--world-size", "8",
                 "--set", "gradient_accumulation_steps=2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["zero_optimization"]["stage"] == 2 and printed["fp16"]["enabled"] is True
    assert printed["train_batch_size"] == printed["train_micro_batch_size_per_gpu"] * 2 * 8
    assert printed["data_types"] == {"grad_accum_dtype": "fp32"}
    assert main(["--cfg", str(repo / "cfg/sd15_lora.json"), "--print-deepspeed-config"]) == 0
    assert json.loads(capsys.readouterr().out)["zero_optimization"]["stage"] == 1  # fp16, one GPU: never stage 0
    assert list(tmp_path.iterdir()) == [] and not torch.distributed.is_initialized()
    assert main(["--cfg", str(repo / "cfg/sd15_lora.json"), "--print-deepspeed-config", "--set", "use_lora.rank=0"]) == 2
    assert "use_lora.rank" in capsys.readouterr().err
