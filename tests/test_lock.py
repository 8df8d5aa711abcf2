"""One run per folder: the lock on checkpoint_dir/output_dir, stale locks, and rejected runs that leave
the disk as it was (in-process through the training entrypoint)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from ds_diffusers import lock
from ds_diffusers.config import validate_dict
from ds_diffusers.errors import ConfigError
from tests.helpers import with_changes


@pytest.fixture
def live_process():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield child.pid
    child.stdin.close()
    child.wait()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(folder, pid, host=None, started=None):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": host or socket.gethostname(), "pid": pid, "started": started or lock._start_time(pid), "time": 0}
    (folder / lock.LOCK_NAME).write_text(json.dumps(record))


def test_acquire_records_holder_and_release_removes_what_it_created(tmp_path):
    held = lock.acquire(str(tmp_path / "a" / "b"), "output_dir")
    record = json.loads((tmp_path / "a" / "b" / lock.LOCK_NAME).read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    lock.release(held)
    assert list(tmp_path.iterdir()) == []  # the folders it made, empty again, are gone


def test_live_holder_refuses_and_stale_holder_is_taken_over(tmp_path, live_process, capsys):
    write_lock(tmp_path / "ckpt", live_process)
    with pytest.raises(ConfigError) as info:
        lock.acquire(str(tmp_path / "ckpt"), "checkpoint_dir")
    assert info.value.field == "checkpoint_dir" and f"pid {live_process}" in info.value.fix
    assert socket.gethostname() in info.value.fix and lock.LOCK_NAME in info.value.fix

    write_lock(tmp_path / "stale", dead_pid())
    held = lock.acquire(str(tmp_path / "stale"), "checkpoint_dir")
    assert "stale lock" in capsys.readouterr().out
    assert json.loads(held.path.read_text())["pid"] == os.getpid()
    lock.release(held)
    # a live pid whose start time differs is a new process that reused a dead holder's pid
    write_lock(tmp_path / "reused", os.getpid(), started="1")
    lock.release(lock.acquire(str(tmp_path / "reused"), "checkpoint_dir"))
    # another host's lock cannot be checked from here: refused
    write_lock(tmp_path / "remote", 1, host="some-other-node")
    with pytest.raises(ConfigError):
        lock.acquire(str(tmp_path / "remote"), "output_dir")


def test_earlier_attempt_of_a_requeued_slurm_job_is_stale_even_from_another_node(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    held = lock.acquire(str(tmp_path / "ckpt"), "checkpoint_dir")
    record = json.loads(held.path.read_text())
    record["host"] = "node-that-died"
    held.path.write_text(json.dumps(record))
    assert lock.holder_if_live(str(tmp_path / "ckpt")) is not None  # same attempt: a live run elsewhere
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert lock.holder_if_live(str(tmp_path / "ckpt")) is None
    monkeypatch.setenv("SLURM_JOB_ID", "999")  # another job's lock is not ours to take
    assert lock.holder_if_live(str(tmp_path / "ckpt")) is not None


def test_second_folder_refused_releases_the_first(tmp_path, live_process):
    cfg = validate_dict(with_changes(checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out")))
    write_lock(tmp_path / "out", live_process)
    refusal = lock.lock_run_folders(cfg)
    assert refusal is not None and refusal.field == "output_dir"
    assert not (tmp_path / "ckpt").exists() and lock._held == []
    with pytest.raises(ConfigError) as info:
        lock.check_not_locked(cfg)
    assert info.value.field == "output_dir"


def test_train_entrypoint_refuses_a_locked_folder_and_rejected_runs_create_nothing(tiny_assets, tmp_path, live_process, capsys):
    from ds_diffusers.train import main

    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    args = ["--cfg", "cfg/default.json", "--set", f"pretrained_model_name_or_path={tiny_assets.model_dir}",
            f"dataset_dir={tiny_assets.dataset_dir}", f"output_dir={out}", f"checkpoint_dir={ckpt}"]
    assert main([*args, "optimizer.type=SGDX"]) == 2
    assert "optimizer.type='SGDX'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither folder was created
    write_lock(ckpt, live_process)
    assert main([*args, "resume_from_checkpoint=latest"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ds-diffusers:")]
    assert len(err) == 1 and "another run is using this folder" in err[0] and f"pid {live_process}" in err[0]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["ckpt", f"ckpt/{lock.LOCK_NAME}"]
