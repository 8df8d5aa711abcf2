"""Checkpoint faults without processes: a full disk during a save, truncated files in the newest
checkpoint (named, with the previous complete step to resume from), Ctrl-C during a save."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from ds_diffusers import checkpoint
from ds_diffusers.engine.checkpoint_files import MODEL_STATES
from ds_diffusers.errors import ConfigError, TrainingError
from ds_diffusers.train_state import TrainState
from tests.fault_injection.dsd_faults import PATCHES, fail_engine_save
from tests.helpers import SINGLE as DIST
from tests.helpers import FakeEngine, overwrite_in_place
from tests.helpers import checkpoint_model_cfg as make_cfg

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


def test_full_disk_with_one_checkpoint_kept_says_what_helps(tmp_path):
    """With checkpoints_total_limit 1 a lower limit cannot help: the new step is written before the old
    one is pruned. The message says how much room one more step needs, or to move checkpoint_dir."""
    cfg = make_cfg(tmp_path, checkpoints_total_limit=1)
    save(cfg, 3)
    with pytest.raises(TrainingError) as info:
        save(cfg, 6, FakeEngine(OSError(28, "No space left on device")))
    message = str(info.value)
    assert "checkpoints_total_limit" not in message
    assert "free about 0.1 GB (the size of step_3)" in message and "move checkpoint_dir" in message
    with pytest.raises(TrainingError, match="lower checkpoints_total_limit, now 3"):
        save(make_cfg(tmp_path, checkpoints_total_limit=3), 6, FakeEngine(OSError(28, "No space left on device")))


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


def tensor_data_offset(path: Path) -> tuple[int, int]:
    """Where the largest stored tensor's bytes lie in a torch zip file: (offset, length)."""
    with zipfile.ZipFile(path) as archive:
        member = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda info: info.file_size)
    with open(path, "rb") as handle:
        handle.seek(member.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
    return member.header_offset + 30 + name_length + extra_length, member.file_size


def test_bytes_changed_in_place_are_found_by_their_digest(tmp_path, capsys):
    """A same-size overwrite keeps the zip directory, so only the digest recorded at save time finds it;
    resume falls back from latest, refuses the step by name, and the offline export refuses it."""
    from ds_diffusers.export.offline import export_checkpoint

    cfg = make_cfg(tmp_path)
    for step in (3, 6):
        save(cfg, step)
    step_6 = tmp_path / "ckpt" / "step_6"
    assert sorted(json.loads((step_6 / checkpoint.META_FILE).read_text())["file_digests"]) == [MODEL_STATES, "rank_0.pt"]
    damaged = step_6 / MODEL_STATES
    overwrite_in_place(damaged, *tensor_data_offset(damaged))
    # still a readable torch file (the old check passed it), with changed values
    assert not torch.equal(torch.load(damaged, weights_only=False)["w"], torch.ones(4))
    assert checkpoint.damaged_file(step_6) == damaged

    assert checkpoint.resume_target(make_cfg(tmp_path, resume_from_checkpoint="latest")) == tmp_path / "ckpt" / "step_3"
    warning = capsys.readouterr().err
    assert f"{damaged} is damaged" in warning and "changed since it was saved" in warning and warning.count("\n") == 1
    with pytest.raises(ConfigError) as info:
        checkpoint.resume_target(make_cfg(tmp_path, resume_from_checkpoint=str(step_6)))
    assert str(damaged) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "export"))
    assert str(damaged) in str(info.value) and f"--checkpoint {tmp_path / 'ckpt' / 'step_3'}" in str(info.value)
    assert not (tmp_path / "export").exists()


def test_step_saved_without_digests_is_accepted_with_a_note(tmp_path, capsys):
    cfg = make_cfg(tmp_path)
    save(cfg, 3)
    meta_file = tmp_path / "ckpt" / "step_3" / checkpoint.META_FILE
    meta = json.loads(meta_file.read_text())
    del meta["file_digests"]
    meta_file.write_text(json.dumps(meta))
    assert checkpoint.resume_target(make_cfg(tmp_path, resume_from_checkpoint="latest")) == tmp_path / "ckpt" / "step_3"
    assert "has no file digests" in capsys.readouterr().err


def test_each_rank_hashes_the_files_it_wrote(tmp_path):
    from ds_diffusers.checkpoint_digests import own_file_digests

    names = [MODEL_STATES, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_model_states.pt", "rank_0.pt", "rank_1.pt", checkpoint.META_FILE]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    mine = [sorted(own_file_digests(tmp_path, rank)) for rank in (0, 1)]
    assert mine == [sorted([MODEL_STATES, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank_0.pt"]),
                    sorted(["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
                            "rank_1.pt"])]


def test_second_ctrl_c_during_a_save_removes_the_partial_folder(tmp_path):
    cfg = make_cfg(tmp_path)
    save(cfg, 3)
    with pytest.raises(KeyboardInterrupt):
        save(cfg, 6, FakeEngine(KeyboardInterrupt()))  # raised after the first file is written
    assert not (tmp_path / "ckpt" / "step_6").exists()
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_3"


def test_ctrl_c_asks_for_a_stop_and_a_second_one_abandons(monkeypatch):
    """The first SIGINT is a stop request like SIGTERM (a save, then exit 130, not a traceback in the
    middle of the save); the second raises KeyboardInterrupt, which `checkpoint.save` cleans up after."""
    from ds_diffusers import preemption

    monkeypatch.setattr(preemption, "_received", [])
    saved = {signum: signal.getsignal(signum) for signum in preemption.STOP_SIGNALS}
    try:
        preemption.install()
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.signalled(1, 0) and preemption.signal_names() == "SIGINT"
        assert preemption.exit_code() == preemption.EXIT_INTERRUPTED != preemption.EXIT_PREEMPTED
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    monkeypatch.setattr(preemption, "_received", [signal.SIGTERM])
    assert preemption.exit_code() == preemption.EXIT_PREEMPTED


def test_changed_settings_are_refused_before_any_model_loads(tmp_path, monkeypatch):
    """`resume_or_fresh_start` is what `train.set_up` runs before it loads the models: a resume the
    checkpoint cannot serve must stop there, from the metadata alone, not after a 75 s model load.
    A topology change it can convert passes (the conversion happens at load)."""
    from ds_diffusers import checkpoint_manager

    save(make_cfg(tmp_path, zero_optimization={"stage": 0}), 4)  # the seed cfg: micro 1 x accumulation 32 x 1 process
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: pytest.fail("the refusal came at load time"))
    changed = make_cfg(tmp_path, resume_from_checkpoint="latest", use_ema=True)
    with pytest.raises(ConfigError) as info:
        checkpoint_manager.resume_or_fresh_start(changed, 1)
    assert "use_ema = False" in info.value.fix and "this run has True" in info.value.fix
    other_stage = make_cfg(tmp_path, resume_from_checkpoint="latest", zero_optimization={"stage": 3})
    assert checkpoint_manager.resume_or_fresh_start(other_stage, 2) == tmp_path / "ckpt" / "step_4"
    with pytest.raises(ConfigError, match="global batch of 32") as info:  # 32 on 3 processes of micro 1
        checkpoint_manager.resume_or_fresh_start(other_stage, 3)
    assert info.value.field == "gradient_accumulation_steps"
    sgd = make_cfg(tmp_path, resume_from_checkpoint="latest", optimizer={"type": "SGD", "params": {"lr": 0.1}})
    with pytest.raises(ConfigError, match="Adam family only, not SGD's; resume on 1 process, ZeRO-0"):
        checkpoint_manager.resume_or_fresh_start(sgd, 2)
    same = make_cfg(tmp_path, resume_from_checkpoint="latest", zero_optimization={"stage": 0})
    assert checkpoint_manager.resume_or_fresh_start(same, 1) == tmp_path / "ckpt" / "step_4"
