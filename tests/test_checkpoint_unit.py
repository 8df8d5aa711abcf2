"""Checkpoint bookkeeping without processes: what counts as complete, retention, refusals."""

from __future__ import annotations

import shutil

import pytest

from ds_diffusers import checkpoint, checkpoint_manager
from ds_diffusers.errors import ConfigError
from tests.helpers import checkpoint_cfg as make_cfg


def make_step(root, step, complete=True):
    folder = root / f"step_{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / checkpoint.META_FILE).write_text("{}")


def test_only_complete_steps_count_and_prune_keeps_newest_and_latest(tmp_path):
    root = tmp_path / "ckpt"
    for step in (5, 10, 15, 20):
        make_step(root, step)
    make_step(root, 25, complete=False)
    assert checkpoint.complete_steps(str(root)) == [5, 10, 15, 20]
    checkpoint_manager.prune(str(root), keep=2, protected=5)
    assert checkpoint.complete_steps(str(root)) == [5, 15, 20]  # 5 is what latest names: kept
    assert (root / "step_25").is_dir()  # an incomplete folder is left for the next save to overwrite


def test_resume_target(tmp_path):
    cfg = make_cfg(tmp_path, resume_from_checkpoint=True)
    assert checkpoint.resume_target(cfg) is None  # nothing saved yet: fresh start
    make_step(tmp_path / "ckpt", 7)
    (tmp_path / "ckpt" / "latest").write_text("step_7")
    assert checkpoint.resume_target(cfg) == tmp_path / "ckpt" / "step_7"
    assert checkpoint.resume_target(make_cfg(tmp_path, resume_from_checkpoint=False)) is None
    make_step(tmp_path / "ckpt", 9, complete=False)
    with pytest.raises(ConfigError) as info:
        checkpoint.resume_target(make_cfg(tmp_path, resume_from_checkpoint=str(tmp_path / "ckpt" / "step_9")))
    assert info.value.field == "resume_from_checkpoint" and "not a complete" in info.value.fix


def test_fresh_start_refusals(tmp_path):
    checkpoint_manager.check_fresh_start(make_cfg(tmp_path, resume_from_checkpoint=False))  # empty folders: fine
    # a run that failed before its first save (or a requeued job that died then) starts again
    (tmp_path / "out" / "logs").mkdir(parents=True)
    (tmp_path / "out" / "logs" / "metrics.jsonl").write_text("")
    (tmp_path / "out" / "ds_config.json").write_text("{}")
    (tmp_path / "ckpt" / "step_2").mkdir(parents=True)  # the partial folder of an interrupted first save
    checkpoint_manager.check_fresh_start(make_cfg(tmp_path, resume_from_checkpoint=False))
    checkpoint_manager.check_fresh_start(make_cfg(tmp_path, resume_from_checkpoint="latest"))
    make_step(tmp_path / "ckpt", 4)  # a checkpoint is a previous run's result
    with pytest.raises(ConfigError) as info:
        checkpoint_manager.check_fresh_start(make_cfg(tmp_path, resume_from_checkpoint=False))
    assert info.value.field == "overwrite_output_dir" and "holds checkpoints" in info.value.fix
    shutil.rmtree(tmp_path / "ckpt" / "step_4")
    (tmp_path / "out" / "unet").mkdir()
    with pytest.raises(ConfigError):
        checkpoint_manager.check_fresh_start(make_cfg(tmp_path, resume_from_checkpoint="latest"))
    checkpoint_manager.check_fresh_start(make_cfg(tmp_path, resume_from_checkpoint=False, overwrite_output_dir=True))


def test_config_hash_ignores_paths_and_cadence_but_not_training_keys(tmp_path):
    base = make_cfg(tmp_path)
    assert checkpoint.config_hash(base) == checkpoint.config_hash(make_cfg(tmp_path, save_interval=5, max_train_steps=9))
    assert checkpoint.config_hash(base) != checkpoint.config_hash(make_cfg(tmp_path, noise_offset=0.1))
