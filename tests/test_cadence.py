"""When the loop logs, validates and saves, and which checkpoints it keeps: the decisions alone,
with checkpoints written by a fake engine (no processes)."""

from __future__ import annotations

import pytest
import torch

from ds_diffusers import checkpoint
from ds_diffusers.cadence import LogCadence, ValidationCadence
from ds_diffusers.checkpoint_manager import CheckpointManager, stale_steps
from ds_diffusers.train_state import TrainState
from tests.helpers import SINGLE as DIST
from tests.helpers import FakeEngine, checkpoint_model_cfg as make_cfg


class Messages:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def test_log_points_are_first_every_n_last_and_the_save_steps():
    cadence = LogCadence(4, first_step=3, last_step=10, also_at=lambda step: step == 6)
    assert [step for step in range(3, 11) if cadence.should_run(step)] == [3, 4, 6, 8, 10]


def test_validation_by_steps_by_epochs_and_at_the_end_never_twice_for_a_step():
    by_steps = ValidationCadence(every_n_steps=3, every_n_epochs=0)
    assert [step for step in range(1, 8) if by_steps.should_run(step)] == [3, 6]
    assert not by_steps.should_run_at_epoch_end(epoch=0, step=3)
    by_steps.ran(6)
    assert not by_steps.should_run_at_end(6) and by_steps.should_run_at_end(7)

    by_epochs = ValidationCadence(every_n_steps=0, every_n_epochs=2)
    assert not any(by_epochs.should_run(step) for step in range(1, 10))
    assert not by_epochs.should_run_at_epoch_end(epoch=0, step=3)
    assert by_epochs.should_run_at_epoch_end(epoch=1, step=6)
    by_epochs.ran(6)
    assert not by_epochs.should_run_at_epoch_end(epoch=1, step=6) and not by_epochs.should_run_at_end(6)

    assert not ValidationCadence(0, 0).should_run_at_end(5)  # a run without validation has none at its end


def test_retention_keeps_the_newest_and_never_the_step_latest_names():
    assert stale_steps([2, 4, 6, 8], keep=2, protected=8) == [2, 4]
    assert stale_steps([2, 4, 6, 8], keep=2, protected=2) == [4]
    assert stale_steps([2, 4], keep=3, protected=4) == []


def manager_for(tmp_path, total_steps: int, **changes) -> CheckpointManager:
    engine = FakeEngine()
    engine.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)  # the weight check reads it
    parts = {"engine": engine, "train_state": TrainState(), "ema": None}
    return CheckpointManager(make_cfg(tmp_path, **changes), DIST, parts, total_steps)


def run_steps(manager: CheckpointManager, logger: Messages, stop_at: int | None = None) -> list[int]:
    """The loop's calls, step by step; returns the steps whose checkpoints are left."""
    for step in range(1, manager.total_steps + 1):
        manager.state.global_step = step
        manager.after_step(logger, stop=step == stop_at)
        if step == stop_at:
            break
    else:
        manager.at_end(logger)
    return checkpoint.complete_steps(manager.cfg.checkpoint_dir)


def saved_steps(logger: Messages) -> list[int]:
    return [int(line.split("(step ")[1].split(",")[0]) for line in logger.lines if line.startswith("checkpoint saved: ")]


def test_saves_every_interval_and_at_the_end_keeping_the_newest(tmp_path):
    manager, logger = manager_for(tmp_path, total_steps=10, save_interval=3, checkpoints_total_limit=2), Messages()
    assert [step for step in range(1, 11) if manager.should_save(step)] == [3, 6, 9]
    assert run_steps(manager, logger) == [9, 10]
    assert saved_steps(logger) == [3, 6, 9, 10]
    assert (tmp_path / "ckpt" / checkpoint.LATEST).read_text() == "step_10"


def test_last_step_on_the_interval_is_saved_once(tmp_path):
    manager, logger = manager_for(tmp_path, total_steps=6, save_interval=3), Messages()
    assert run_steps(manager, logger) == [3, 6] and saved_steps(logger) == [3, 6]
    manager.at_end(logger)  # again, as after a resume at the last step's checkpoint: nothing new
    assert saved_steps(logger) == [3, 6]


def test_save_interval_0_saves_only_at_the_end(tmp_path):
    manager, logger = manager_for(tmp_path, total_steps=5, save_interval=0), Messages()
    assert run_steps(manager, logger) == [5] and saved_steps(logger) == [5]


@pytest.mark.parametrize("stop_at", [4, 5])
def test_a_stop_saves_once_also_on_a_save_step(tmp_path, stop_at):
    manager, logger = manager_for(tmp_path, total_steps=10, save_interval=4), Messages()
    assert run_steps(manager, logger, stop_at=stop_at) == sorted({4, stop_at})
    assert saved_steps(logger) == sorted({4, stop_at})
    assert logger.lines[-1].startswith(f"stopped by a peer rank's signal at step {stop_at}; checkpoint saved in ")
