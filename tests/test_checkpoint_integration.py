"""Checkpoints through DeepSpeed's launcher with 2 processes: exact resume for LoRA under
ZeRO-2 (full under ZeRO-2 from raw shards in test_shards_integration; under ZeRO-3 on the real-shaped
models: SD 1.5 full with EMA and the held-out loss in test_real_arch_integration, SDXL full and LoRA
in test_sdxl_integration), ZeRO-3 exports and EMA equal to a ZeRO-0 run, crash safety, and refusals
that protect earlier runs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ds_diffusers.checkpoint import damaged_file, resume_target
from ds_diffusers.config import load_config
from ds_diffusers.errors import ConfigError
from tests.fault_injection import injected
from tests.helpers import (REPO, assert_ok, launch, losses, max_diff, overwrite_in_place, run_cfg, tensors, three_runs,
                           validation_losses)
from tests.helpers import RESUME_COMMON as COMMON

pytestmark = pytest.mark.multiprocess


def test_lora_resume_is_exact(tiny_assets, tmp_path):
    straight, resumed = three_runs(tiny_assets, tmp_path, "zero_optimization.stage=2", "use_lora.action=true",
                                   "optimizer.params.lr=0.01")
    a, b = losses(straight), losses(resumed)
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    lora_a = tensors(straight / "pytorch_lora_weights.safetensors")
    assert max_diff(lora_a, tensors(resumed / "pytorch_lora_weights.safetensors")) <= 1e-6
    assert any(t.abs().max() > 0 for k, t in lora_a.items() if "lora_B" in k or "lora.up" in k)  # adapters trained


def test_zero3_export_and_ema_equal_zero0(tiny_assets, tmp_path):
    """Also the held-out loss of the EMA weights at step 3 and at the end: ZeRO-3 (the EMA swapped into
    the partitions, forward passes gathering on both ranks) gives ZeRO-0's value."""
    runs = {}
    for stage in (0, 3):
        out = tmp_path / f"zero{stage}"
        assert_ok(launch(run_cfg(tiny_assets, out, *COMMON, f"zero_optimization.stage={stage}", "max_train_steps=6",
                                 "use_ema=true", "ema_decay=0.9", "validation_split=3", "validation_steps=3",
                                 "validation_prompts=[]"), procs=2))
        runs[stage] = out / "model"
        # each rank hashed the files it wrote and rank 0 recorded them all
        step_dir = next((out / "checkpoints").glob("step_*"))
        recorded = json.loads((step_dir / "ds_diffusers.json").read_text())["file_digests"]
        assert sorted(recorded) == sorted(f.name for f in step_dir.iterdir() if f.name != "ds_diffusers.json")
        assert "rank_1.pt" in recorded
    val3, val0 = validation_losses(runs[3]), validation_losses(runs[0])
    assert sorted(val3) == sorted(val0) == [3, 6]
    assert max(abs(val3[step] - val0[step]) for step in val3) <= 1e-5
    for sub in ("unet", "unet_ema"):
        zero3 = tensors(runs[3] / sub / "diffusion_pytorch_model.safetensors")
        zero0 = tensors(runs[0] / sub / "diffusion_pytorch_model.safetensors")
        assert all(t.numel() > 0 for t in zero3.values())
        assert max_diff(zero3, zero0) <= 1e-5, sub
    # the EMA is a real average, not a copy of the weights
    assert max_diff(tensors(runs[3] / "unet" / "diffusion_pytorch_model.safetensors"),
                    tensors(runs[3] / "unet_ema" / "diffusion_pytorch_model.safetensors")) > 1e-6
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(runs[3], subfolder="unet_ema")
    # offline export of the ZeRO-3 checkpoint gives the same tensors as the end-of-run export
    offline = tmp_path / "offline"
    result = subprocess.run([sys.executable, "-m", "ds_diffusers.export", "--checkpoint", str(tmp_path / "zero3" / "checkpoints"),
                             "--out", str(offline)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for sub in ("unet", "unet_ema"):
        assert max_diff(tensors(offline / sub / "diffusion_pytorch_model.safetensors"),
                        tensors(runs[3] / sub / "diffusion_pytorch_model.safetensors")) == 0.0


def test_single_process_zero2_runs_as_zero0_and_exports_offline(tiny_assets, tmp_path):
    """One process has nothing to partition: the engine runs ZeRO-2 as stage 0, and the offline
    export must read the stage-0 layout that leaves on disk."""
    assert_ok(launch(run_cfg(tiny_assets, tmp_path, *COMMON, "zero_optimization.stage=2", "max_train_steps=3")))
    assert json.loads((tmp_path / "model" / "ds_config.json").read_text())["zero_optimization"]["stage"] == 0
    offline = tmp_path / "offline"
    result = subprocess.run([sys.executable, "-m", "ds_diffusers.export", "--checkpoint", str(tmp_path / "checkpoints"),
                             "--out", str(offline)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert max_diff(tensors(offline / "unet" / "diffusion_pytorch_model.safetensors"),
                    tensors(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors")) == 0.0


def test_kill_during_save_keeps_previous_checkpoint(tiny_assets, tmp_path):
    overrides = run_cfg(tiny_assets, tmp_path, *COMMON, "max_train_steps=9", "save_interval=3")
    overrides = [o for o in overrides if o != "save_interval=0"]
    with injected("kill_during_save:6"):
        killed = launch(overrides)
    assert killed.returncode != 0
    checkpoints = tmp_path / "checkpoints"
    # the save of step 6 was killed between files: latest still names step 3, which is complete
    assert (checkpoints / "latest").read_text() == "step_3"
    assert (checkpoints / "step_3" / "ds_diffusers.json").is_file()
    assert not (checkpoints / "step_6" / "ds_diffusers.json").exists()
    resumed = launch(overrides + ["resume_from_checkpoint=latest"])
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout + resumed.stderr and "at step 3" in resumed.stdout + resumed.stderr
    assert "taking over the stale lock" in resumed.stdout + resumed.stderr  # the killed rank 0 could not release it
    assert (checkpoints / "latest").read_text() == "step_9"
    # steps 4-6 ran twice; the resumed run dropped the first run's records past step 3, so each step is logged once
    logged = [json.loads(line)["step"] for line in (tmp_path / "model" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_changed_bytes_in_the_newest_checkpoint_are_found(tiny_assets, tmp_path):
    """4 KiB of random bytes over the middle of the newest step's model-states file (same size; torch
    still loads it, with changed optimizer state): the export and that step by path are refused in one
    line naming the file, and latest resumes from the step before with a one-line warning."""
    overrides = [o for o in run_cfg(tiny_assets, tmp_path, *COMMON, "max_train_steps=6", "save_interval=3")
                 if o != "save_interval=0"]
    assert_ok(launch(overrides))
    checkpoints = tmp_path / "checkpoints"
    damaged = checkpoints / "step_6" / "mp_rank_00_model_states.pt"
    size = damaged.stat().st_size
    assert size > 64 * 4096
    overwrite_in_place(damaged, size // 2 - 2048, 4096)

    export = subprocess.run([sys.executable, "-m", "ds_diffusers.export", "--checkpoint", str(checkpoints),
                             "--out", str(tmp_path / "offline")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert export.returncode == 2 and export.stderr.count("\n") == 1, export.stderr[-2000:]
    assert f"{damaged} is damaged" in export.stderr and f"--checkpoint {checkpoints / 'step_3'}" in export.stderr
    assert not (tmp_path / "offline").exists()
    with pytest.raises(ConfigError) as info:
        resume_target(load_config(REPO / "cfg/default.json", overrides + [f"resume_from_checkpoint={checkpoints / 'step_6'}"]))
    assert str(damaged) in str(info.value) and "\n" not in str(info.value)

    resumed = launch(overrides + ["resume_from_checkpoint=latest"])
    assert_ok(resumed)
    output = resumed.stdout + resumed.stderr
    warnings = [line for line in output.splitlines() if f"{damaged} is damaged" in line]
    assert len(warnings) == 1 and f"resuming from the previous complete checkpoint {checkpoints / 'step_3'}" in warnings[0]
    assert f"resumed from {checkpoints / 'step_3'} at step 3" in output
    # the step saved again from the intact state replaces the damaged one
    assert (checkpoints / "latest").read_text() == "step_6" and damaged_file(checkpoints / "step_6") is None


def test_fresh_run_refuses_to_overwrite_and_changed_rank_is_refused(tiny_assets, tmp_path):
    base = run_cfg(tiny_assets, tmp_path, *COMMON, "max_train_steps=2", "use_lora.action=true", "use_lora.rank=4")
    assert_ok(launch(base))
    weights = (tmp_path / "model" / "pytorch_lora_weights.safetensors").read_bytes()
    again = launch(base)
    assert again.returncode == 2
    assert "overwrite_output_dir" in again.stderr and "holds checkpoints" in again.stderr
    changed = launch(base + ["resume_from_checkpoint=latest", "use_lora.rank=8", "max_train_steps=4"])
    assert changed.returncode == 2
    assert "use_lora.rank = 4" in changed.stderr and "this run has 8" in changed.stderr
    assert (tmp_path / "model" / "pytorch_lora_weights.safetensors").read_bytes() == weights
    assert json.loads((tmp_path / "checkpoints" / "step_2" / "ds_diffusers.json").read_text())["global_step"] == 2


def test_zero3_lora_export_equals_zero0_and_loads(tiny_assets, tmp_path):
    exports = {}
    for stage in (0, 3):
        out = tmp_path / f"zero{stage}"
        assert_ok(launch(run_cfg(tiny_assets, out, *COMMON, f"zero_optimization.stage={stage}", "max_train_steps=4",
                                 "use_lora.action=true", "use_lora.rank=4", "use_lora.alpha=8", "optimizer.params.lr=0.01"),
                         procs=2))
        exports[stage] = out / "model" / "pytorch_lora_weights.safetensors"
    zero3, zero0 = tensors(exports[3]), tensors(exports[0])
    assert all(t.numel() > 0 for t in zero3.values())
    assert max_diff(zero3, zero0) <= 1e-5
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_assets.model_dir)
    pipe.load_lora_weights(exports[3].parent)
    assert next(iter(pipe.unet.peft_config.values())).lora_alpha == 8
