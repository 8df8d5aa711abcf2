"""The global batch on another process count (`topology.rebatched`) and what a topology change is."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds_diffusers.errors import ConfigError
from ds_diffusers.topology import changed_topology, rebatched, requested_batch
from tests.helpers import checkpoint_cfg

STEP = Path("ckpt/step_4")


def meta_of(cfg, world_size: int, requested=None) -> dict:
    meta = {"world_size": world_size, "training_config": cfg.model_dump(),
            "settings": {"number of processes": world_size, "zero_optimization.stage": cfg.zero_optimization.stage}}
    if requested is not None:
        meta["requested_batch"] = requested
    return meta


def test_accumulation_scales_to_keep_the_global_batch(tmp_path):
    saved = checkpoint_cfg(tmp_path, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    cfg, line = rebatched(saved, meta_of(saved, 4), 1, STEP)  # 4 x 2 x 4 = 32 on one process
    assert cfg.gradient_accumulation_steps == 8
    assert line == "global batch 32 kept on 1 process(es): gradient_accumulation_steps 2 -> 8"
    cfg, line = rebatched(saved, meta_of(saved, 4), 4, STEP)
    assert cfg is saved and line is None
    # saved on 1 process with the scaled accumulation; the user's cfg still asks for 2: back to 2 on 4
    scaled = saved.model_copy(update={"gradient_accumulation_steps": 8})
    cfg, line = rebatched(saved, meta_of(scaled, 1, requested_batch(saved)), 4, STEP)
    assert cfg.gradient_accumulation_steps == 2 and line is None
    with pytest.raises(ConfigError) as info:
        rebatched(saved, meta_of(saved, 4), 3, STEP)  # 32 is no multiple of 4 x 3
    assert info.value.field == "gradient_accumulation_steps" and "global batch of 32" in info.value.fix


def test_a_batch_the_user_sets_is_taken_with_a_line(tmp_path):
    saved = checkpoint_cfg(tmp_path, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    asked = checkpoint_cfg(tmp_path, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=3)
    cfg, line = rebatched(asked, meta_of(saved, 4), 2, STEP)
    assert cfg is asked and line.startswith("global batch 32 -> 24 ")


def test_buckets_resume_on_another_process_count_only_with_the_same_global_micro_batch(tmp_path):
    """The bucket schedule is cut into global micro-batches: 2 processes of 2 resume as 4 of 1, not as 1 of 2."""
    saved = checkpoint_cfg(tmp_path, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2,
                           aspect_ratio_buckets=True)
    cfg, line = rebatched(checkpoint_cfg(tmp_path, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2,
                                         aspect_ratio_buckets=True), meta_of(saved, 2), 4, STEP)
    assert cfg.gradient_accumulation_steps == 2 and line is None
    with pytest.raises(ConfigError) as info:
        rebatched(saved, meta_of(saved, 2), 1, STEP)
    assert info.value.field == "train_micro_batch_size_per_gpu" and "global micro-batches of 4 images" in info.value.fix


def test_topology_change_names_both_sides(tmp_path):
    cfg = checkpoint_cfg(tmp_path)
    saved = meta_of(cfg, 2)
    assert changed_topology(saved, {"number of processes": 2, "zero_optimization.stage": cfg.zero_optimization.stage}) is None
    assert changed_topology(saved, {"number of processes": 1, "zero_optimization.stage": 3}) == \
        f"2 processes, ZeRO-{cfg.zero_optimization.stage} -> 1 process, ZeRO-3"
