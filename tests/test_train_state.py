"""The training position as one object: its state dict round trip, and the checkpoint layout it is
saved in (the one earlier versions wrote and read), without processes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ds_diffusers import checkpoint
from ds_diffusers.train_state import TrainState
from tests.helpers import SINGLE as DIST
from tests.helpers import FakeEngine, checkpoint_model_cfg as make_cfg


class ResumableEngine(FakeEngine):
    def load_checkpoint(self, load_dir, tag, **_):
        return str(Path(load_dir) / tag), {}


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_state_dict_round_trip_restores_position_and_random_streams():
    torch.manual_seed(1)
    saved = TrainState(global_step=7, epoch=2, samples_in_epoch=24).state_dict()
    expected = draws()
    restored = TrainState()
    restored.load_state_dict(saved)
    assert (restored.global_step, restored.epoch, restored.samples_in_epoch) == (7, 2, 24)
    assert draws() == expected  # the same noise, timesteps and flips as if the run had not stopped


def test_checkpoint_keeps_the_position_in_the_metadata_and_the_rng_per_rank(tmp_path):
    """The layout earlier versions wrote: checkpoints from before TrainState resume, and back."""
    cfg = make_cfg(tmp_path)
    step_dir = checkpoint.save(ResumableEngine(), cfg, DIST, TrainState(global_step=4, epoch=1, samples_in_epoch=16))
    meta = json.loads((step_dir / checkpoint.META_FILE).read_text())
    assert (meta["global_step"], meta["epoch"], meta["samples_in_epoch"]) == (4, 1, 16)
    rank_file = torch.load(step_dir / "rank_0.pt", weights_only=False)
    assert rank_file.keys() == {"rng", "ema"} and rank_file["rng"].keys() >= {"python", "numpy", "torch"}
    expected = draws()

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state = TrainState()
    meta = checkpoint.load(ResumableEngine(), cfg, DIST, step_dir, state)
    assert (state.global_step, state.epoch, state.samples_in_epoch) == (4, 1, 16) and meta["changed_keys"] == []
    assert draws() == expected


def test_a_resume_onto_other_training_data_says_the_order_changed(tmp_path):
    """The data order's key is saved with the position; a run whose data give another order says so
    in its resume line, one with the same data (or a checkpoint from before the key) says nothing."""
    from ds_diffusers.checkpoint_manager import CheckpointManager

    cfg = make_cfg(tmp_path)
    step_dir = checkpoint.save(ResumableEngine(), cfg, DIST, TrainState(global_step=4, samples_in_epoch=16, data_order="96 rows"))
    assert json.loads((step_dir / checkpoint.META_FILE).read_text())["data_order"] == "96 rows"

    def resume_line(data_order: str) -> str:
        state = TrainState(data_order=data_order)
        parts = {"engine": ResumableEngine(), "train_state": state, "ema": None}
        line = CheckpointManager(cfg, DIST, parts, total_steps=10).load(step_dir).message()
        assert state.data_order == data_order and state.samples_in_epoch == 16
        return line

    assert "training data" not in resume_line("96 rows")
    assert "changed since: the training data (96 rows -> 120 rows: the epoch's order is another one" in resume_line("120 rows")
    old = TrainState()
    old.load_state_dict({"global_step": 1, "epoch": 0, "samples_in_epoch": 0, "rng": TrainState().state_dict()["rng"]})
    assert old.data_order_was is None
