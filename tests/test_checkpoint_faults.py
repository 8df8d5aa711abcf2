"""Checkpoint faults without processes: a full disk during a save, truncated files in the newest
checkpoint (named, with the previous complete step to resume from)."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import pytest
import torch

from ds_diffusers import checkpoint
from ds_diffusers.engine.checkpoint_files import MODEL_STATES
from ds_diffusers.errors import ConfigError, TrainingError
from ds_diffusers.train_state import TrainState
from tests.fault_injection.dsd_faults import PATCHES, fail_engine_save
from tests.helpers import SINGLE as DIST
from tests.helpers import FakeEngine, checkpoint_model_cfg as make_cfg

def save(cfg, step, engine=None):
    return checkpoint.save(engine or FakeEngine(), cfg, DIST, TrainState(global_step=step, epoch=0, samples_in_epoch=step))


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1024"),
    OSError(28, "No space left on device"),
    None,  # the fault the launcher tests inject (tests/fault_injection), on this stand-in engine
])
def test_full_disk_during_save_names_the_disk_and_removes_the_partial_folder(tmp_path, monkeypatch, failure):
    cfg = make_cfg(tmp_path)
    save(cfg, 3)
    if failure is None:
        monkeypatch.setattr(FakeEngine, "save_checkpoint", fail_engine_save(FakeEngine.save_checkpoint, "enospc_during_save", 6))
    with pytest.raises(TrainingError) as info:
        save(cfg, 6, FakeEngine(failure))
    message = str(info.value)
    assert f"no space left on {tmp_path / 'ckpt'}" in message and "still names step_3" in message and "\n" not in message
    assert not (tmp_path / "ckpt" / "step_6").exists()
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_3"
    assert checkpoint.resume_target(make_cfg(tmp_path, resume_from_checkpoint="latest")) == tmp_path / "ckpt" / "step_3"


@pytest.mark.parametrize("fault", sorted(PATCHES))
def test_fault_injection_still_finds_the_function_it_patches(fault):
    """The launcher and Slurm tests inject faults by patching these names from outside; a rename
    would make them fail minutes in (or pass without the fault), so it fails here first."""
    module_name, attribute, _ = PATCHES[fault]
    target = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    # The arguments the wrappers read by position (checkpoint.save's wrapper reads only its returned step folder).
    expected = {"save_checkpoint": ["self", "save_dir", "tag"], "signalled": ["global_step", "rank"]}.get(part, [])
    assert callable(target) and list(inspect.signature(target).parameters)[: len(expected)] == expected


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("victim", [MODEL_STATES, "rank_0.pt", checkpoint.META_FILE])
def test_truncated_newest_checkpoint_is_named_and_latest_falls_back(tmp_path, capsys, victim):
    cfg = make_cfg(tmp_path)
    for step in (3, 6):
        save(cfg, step)
    assert checkpoint.damaged_file(tmp_path / "ckpt" / "step_6") is None
    damaged = tmp_path / "ckpt" / "step_6" / victim
    truncate(damaged)
    assert checkpoint.damaged_file(tmp_path / "ckpt" / "step_6") == damaged

    assert checkpoint.resume_target(make_cfg(tmp_path, resume_from_checkpoint="latest")) == tmp_path / "ckpt" / "step_3"
    warning = capsys.readouterr().err
    assert f"{damaged} is damaged" in warning and "resuming from the previous complete checkpoint" in warning

    explicit = str(tmp_path / "ckpt" / "step_6")
    with pytest.raises(ConfigError) as info:
        checkpoint.resume_target(make_cfg(tmp_path, resume_from_checkpoint=explicit))
    assert str(damaged) in info.value.fix and f"resume_from_checkpoint={tmp_path / 'ckpt' / 'step_3'}" in info.value.fix


def test_damaged_only_checkpoint_says_to_start_again(tmp_path):
    cfg = make_cfg(tmp_path)
    save(cfg, 3)
    (tmp_path / "ckpt" / "step_3" / "rank_0.pt").unlink()
    with pytest.raises(ConfigError) as info:
        checkpoint.resume_target(make_cfg(tmp_path, resume_from_checkpoint="latest"))
    assert "rank_0.pt is damaged" in info.value.fix and "no earlier complete step" in info.value.fix
    assert json.loads((tmp_path / "ckpt" / "step_3" / checkpoint.META_FILE).read_text())["global_step"] == 3
