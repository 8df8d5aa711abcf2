"""The hot loop end to end on the embedded tiny model: what is logged at a log point, a stop signal
on a save step, and the numerics-neutral kernel options. Short runs through the real launcher."""

from __future__ import annotations

import pytest

from ds_diffusers.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED
from tests.fault_injection import injected
from tests.helpers import assert_ok, launch, losses, run_cfg

pytestmark = pytest.mark.multiprocess
ACCUMULATE = ("gradient_accumulation_steps=2", "max_train_steps=4", "train_micro_batch_size_per_gpu=4")


def logged(output_dir) -> dict[int, float]:
    import json

    lines = (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def test_logged_loss_is_the_mean_over_the_log_interval_and_channels_last_changes_nothing(tiny_assets, tmp_path):
    every_step, interval = tmp_path / "every", tmp_path / "interval"
    assert_ok(launch(run_cfg(tiny_assets, every_step, *ACCUMULATE)))
    # run_cfg logs every step; this one every 3rd: log points at the first step, step 3 and the last (4)
    assert_ok(launch(run_cfg(tiny_assets, interval, *ACCUMULATE, "log_every_n_steps=3", "channels_last=true")))
    a, b = logged(every_step / "model"), logged(interval / "model")
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [1, 3, 4]
    # each of a's values is already the mean of its two micro-batches (unit-tested in test_loop)
    assert b[1] == pytest.approx(a[1], rel=1e-5)
    assert b[3] == pytest.approx((a[2] + a[3]) / 2, rel=1e-5)
    assert b[4] == pytest.approx(a[4], rel=1e-5)


def test_stop_signal_on_a_save_step_saves_once_and_exits_75(tiny_assets, tmp_path):
    overrides = run_cfg(tiny_assets, tmp_path, "max_train_steps=6", "save_interval=2", "log_every_n_steps=5")
    with injected("usr1_at_step:2"):
        result = launch(overrides)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_PREEMPTED, output[-3000:]
    assert output.count("checkpoint saved: ") == 1 and "stopped by SIGUSR1 at step 2" in output
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_2"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_2"]
    assert not (tmp_path / "model" / "unet").exists()
    assert "terminate called" not in output  # the process group was torn down before exit


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_a_save_stops_cleanly_with_exit_130(tiny_assets, tmp_path, presses):
    """One Ctrl-C during the step-2 save: the save finishes, the run stops at the next step with its
    save. Two: the save is abandoned and its folder removed. One line either way, no traceback, and the
    same command with resume continues."""
    overrides = run_cfg(tiny_assets, tmp_path, "max_train_steps=6", "save_interval=2")
    fault = "sigint_during_save:2" if presses == 1 else "sigint_twice_during_save:2"
    with injected(fault):
        result = launch(overrides)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    checkpoints = tmp_path / "checkpoints"
    steps = sorted(p.name for p in checkpoints.glob("step_*"))
    if presses == 1:
        assert "stopped by SIGINT at step 3" in output and steps == ["step_2", "step_3"]
    else:
        assert output.count("interrupted by a second Ctrl-C") == 1 and steps == []
        assert not (checkpoints / "latest").exists()
    assert_ok(launch([*overrides, "resume_from_checkpoint=latest"]))


@pytest.mark.slow
def test_compiled_unet_gives_the_same_losses(tiny_assets, tmp_path):
    """torch.compile (inductor) on the CPU takes minutes to compile; hence two steps only."""
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    assert_ok(launch(run_cfg(tiny_assets, plain, "max_train_steps=2")))
    assert_ok(launch(run_cfg(tiny_assets, compiled, "max_train_steps=2", "compile=true"), timeout=1800))
    assert losses(compiled / "model") == pytest.approx(losses(plain / "model"), rel=1e-4)
