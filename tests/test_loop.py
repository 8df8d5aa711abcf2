"""The hot loop's pieces without processes: the device-side loss window and its one reduction, the
non-finite guards, the optimizer fallback, the loader defaults and the kernel options."""

from __future__ import annotations

import math
import types

import pytest
import torch

from ds_diffusers import nonfinite
from ds_diffusers.engine import overflow
from ds_diffusers.config import to_deepspeed_config, validate_dict
from ds_diffusers.config.checks import fused_adam_unavailable
from ds_diffusers.data import default_num_workers, to_device
from ds_diffusers.step_window import StepWindow
from tests.helpers import with_changes


def window_of(micro_losses_per_step: list[list[float]], capacity: int = 2) -> StepWindow:
    window = StepWindow(torch.device("cpu"), capacity)
    for step in micro_losses_per_step:
        for loss in step:
            window.add_micro_batch(torch.tensor(loss))
        window.end_optimizer_step()
    return window


def test_logged_loss_is_the_mean_over_accumulation_and_interval():
    # accumulation 2, log interval 2: four micro-batch losses in one log point
    stats = window_of([[1.0, 2.0], [3.0, 6.0]]).sync(stop_requested=False)
    assert stats.mean_loss == pytest.approx(3.0) and stats.steps == 2
    assert stats.nonfinite_losses == 0 and stats.longest_nonfinite_run == 0 and not stats.stop_requested


def test_window_resets_after_sync_and_grows_past_its_capacity():
    window = window_of([[1.0], [2.0], [3.0]], capacity=1)  # more steps than the capacity: no loss dropped
    assert window.sync(False).mean_loss == pytest.approx(2.0)
    window.add_micro_batch(torch.tensor(10.0))
    window.end_optimizer_step()
    stats = window.sync(True)
    assert stats.mean_loss == pytest.approx(10.0) and stats.steps == 1 and stats.stop_requested


def test_nonfinite_losses_are_counted_not_averaged_and_runs_carry_across_windows():
    window = window_of([[1.0, math.nan], [math.inf, 2.0], [3.0, 3.0]])
    stats = window.sync(False)
    assert stats.mean_loss == pytest.approx(9.0 / 4) and stats.nonfinite_losses == 2
    assert stats.longest_nonfinite_run == 2  # steps 1 and 2, then a clean step 3
    for _ in range(2):
        window.add_micro_batch(torch.tensor(math.nan))
        window.end_optimizer_step()
    assert window.sync(False).longest_nonfinite_run == 2
    window.add_micro_batch(torch.tensor(math.nan))
    window.end_optimizer_step()
    stats = window.sync(False)
    assert stats.longest_nonfinite_run == 3 and math.isnan(stats.mean_loss)  # no finite loss to average


def test_plain_optimizer_skips_nonfinite_gradients_and_reports_overflow():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    engine = types.SimpleNamespace(optimizer=optimizer)
    overflow.skip_nonfinite_steps(engine)
    weight.grad = torch.tensor([1.0, math.nan, 1.0])
    optimizer.step()
    assert optimizer.overflow and torch.equal(weight.detach(), torch.ones(3)) and not optimizer.state
    weight.grad = torch.ones(3)
    optimizer.step()
    assert not optimizer.overflow and (weight.detach() < 1).all()


def test_deepspeed_optimizers_keep_their_own_overflow_check():
    """ZeRO optimizers decide from the norm their step computes; no second check is switched on."""
    optimizer = types.SimpleNamespace(check_grad_overflow=False, overflow=False, step=None)
    overflow.skip_nonfinite_steps(types.SimpleNamespace(optimizer=optimizer))
    assert optimizer.check_grad_overflow is False and optimizer.step is None


def test_weight_check_reads_the_fp32_masters_inside_a_deepspeed_wrapper():
    master = torch.nn.Parameter(torch.zeros(4))
    inner = torch.optim.SGD([master], lr=1.0)
    engine = types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer=inner))
    assert nonfinite.master_weights_finite(engine, torch.device("cpu"))
    nonfinite.check_weights_before_writing(engine, torch.device("cpu"), "checkpoint", 3)
    master.data[2] = math.inf
    assert not nonfinite.master_weights_finite(engine, torch.device("cpu"))
    with pytest.raises(nonfinite.TrainingError, match="no checkpoint was written"):
        nonfinite.check_weights_before_writing(engine, torch.device("cpu"), "checkpoint", 3)


def test_fp16_stop_message_does_not_blame_the_loss_scale():
    text = nonfinite.nonfinite_stop_message(10, 42, 1, fp16=True, largest_weight=0.5)
    assert "loss is nan/inf at 10 optimizer steps in a row" in text and "bf16.enabled" in text
    assert "does not help" in text and "lower use_fp16.initial_scale_power" not in text
    assert "max_nonfinite_steps" in nonfinite.nonfinite_stop_message(10, 42, 1, fp16=False, largest_weight=0.5)


@pytest.mark.parametrize("fp16", [False, True])
def test_stop_message_names_what_is_non_finite_and_the_keys_for_that_case(fp16):
    """Issue 21: the message blamed the learning rate whatever had gone non-finite."""
    def message(largest_weight):
        return nonfinite.nonfinite_stop_message(10, 42, 1, fp16=fp16, largest_weight=largest_weight)

    weights_bad = message(math.inf)  # e.g. weight_decay=Infinity: one step writes inf into the weights
    assert "Non-finite: the weights hold nan/inf" in weights_bad and "weight_decay" in weights_bad
    assert "resume from the last checkpoint" in weights_bad and "bf16" not in weights_bad
    diverged = message(3e12)  # e.g. lr=1e12: finite weights far too large for a finite forward pass
    assert "weights are finite but have diverged (largest |weight| 3e+12)" in diverged
    assert "lower optimizer.params.lr" in diverged
    forward = message(0.8)  # healthy weights: the learning rate is not the likely cause
    assert "the weights are finite (largest |weight| 0.8), so the forward pass gives nan/inf" in forward
    assert "optimizer.params.lr" not in forward
    assert ("bf16.enabled" in forward) if fp16 else ("input images" in forward and "snr_gamma" in forward)
    for text in (weights_bad, diverged, forward):
        assert "\n" not in text and text.startswith("loss is nan/inf at 10 optimizer steps in a row")


def test_largest_master_weight_is_inf_when_one_is_nan():
    master = torch.nn.Parameter(torch.tensor([0.5, -2.0, 1.0]))
    engine = types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer=torch.optim.SGD([master], lr=1.0)))
    assert nonfinite.master_weights_largest(engine, torch.device("cpu")) == 2.0
    master.data[0] = math.nan
    assert nonfinite.master_weights_largest(engine, torch.device("cpu")) == math.inf


def translate(accelerator: str, fused_adam_ok: bool, **changes) -> dict:
    cfg = validate_dict(with_changes(use_fp16={"enabled": False}, **changes))
    return to_deepspeed_config(cfg, world_size=1, accelerator_name=accelerator, fused_adam_ok=fused_adam_ok)


def test_cuda_without_buildable_fused_adam_falls_back_to_torch_fused_adamw():
    assert translate("cuda", True)["optimizer"]["params"].keys() & {"torch_adam", "fused"} == set()
    params = translate("cuda", False)["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    offloaded = translate("cuda", False, zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
    assert "fused" not in offloaded["optimizer"]["params"]  # DeepSpeed's CPU Adam runs there
    assert "fused" not in translate("cpu", False)["optimizer"]["params"]


def test_fused_adam_check_follows_the_op_builder(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    builder = accelerator.create_op_builder("FusedAdamBuilder")
    monkeypatch.setattr(type(builder), "is_compatible", lambda self, verbose=False: False)
    assert "no fused Adam" in fused_adam_unavailable(accelerator)
    monkeypatch.setattr(type(builder), "is_compatible", lambda self, verbose=False: True)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "ninja" in fused_adam_unavailable(accelerator)
    import deepspeed.git_version_info as info

    monkeypatch.setitem(info.installed_ops, "fused_adam", True)
    assert fused_adam_unavailable(accelerator) is None  # prebuilt


def test_default_workers_leave_one_cpu_to_the_loop(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)))
    assert default_num_workers() == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert default_num_workers() == 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert default_num_workers() == 0
    from ds_diffusers.config import Config

    assert Config.model_fields["dataloader_num_workers"].default is None  # unset means this default


def test_to_device_keeps_every_tensor():
    batch = {"pixel_values": torch.rand(2, 3, 8, 8), "input_ids": torch.arange(4).reshape(2, 2)}
    moved = to_device(batch, torch.device("cpu"))
    assert moved.keys() == batch.keys() and all(torch.equal(moved[k], batch[k]) for k in batch)


def test_worker_loader_resumes_mid_epoch_like_the_in_process_one(tokenizer):
    """The default now starts workers: a resume (start mid-epoch, in a later epoch) must still see
    exactly the samples a worker-less loader sees."""
    from ds_diffusers.data import build_train_dataloader
    from tests.helpers import RESOLUTION, in_memory_dataset

    def resumed_epoch(num_workers: int) -> list[torch.Tensor]:
        loader, sampler, dataset = build_train_dataloader(
            in_memory_dataset(8), "image", "text", tokenizer, resolution=RESOLUTION, center_crop=False, random_flip=True,
            seed=0, micro_batch_size=2, num_workers=num_workers, rank=0, world_size=1)
        sampler.set_epoch(1)
        dataset.set_epoch(1)
        sampler.set_start(4)
        return [tensor for batch in loader for tensor in (batch["pixel_values"], batch["input_ids"], batch["index"])]

    with_worker, in_process = resumed_epoch(1), resumed_epoch(0)
    assert len(in_process) == 2 * 3 and all(torch.equal(a, b) for a, b in zip(with_worker, in_process, strict=True))


def test_tf32_switch_and_the_attention_named_in_the_start_up_line():
    from diffusers import UNet2DConditionModel

    from ds_diffusers.models import attention_description, set_tf32

    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cudnn.conv.fp32_precision == "tf32"
        set_tf32(False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee" and torch.backends.cudnn.conv.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved
    unet = UNet2DConditionModel(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, layers_per_block=1,
                                norm_num_groups=4, attention_head_dim=2, sample_size=8)
    assert attention_description(unet, "cpu") == "attention PyTorch SDPA (CPU kernels)"
    assert "flash" in attention_description(unet, "cuda") or "math" in attention_description(unet, "cuda")
