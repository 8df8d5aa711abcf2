"""One run per folder: rank 0 holds `.ds_diffusers.lock` in `checkpoint_dir` and in `output_dir`
for the whole run, so a second run into the same folders (started at the same time, or resuming
while the first still writes) is refused instead of interleaving metrics and overwriting step folders.

The lock file holds the holder's host, pid and process start time. A lock whose holder is gone (same
host, and no process with that pid and start time) is stale and taken over with a notice, as is one
left by an earlier attempt of the same Slurm job (a requeued job may start on another node); a lock
held from another host otherwise cannot be checked from here, so the message says how to remove it.
Release removes the lock files, and the folders the lock created when they are still empty, so a
run refused after taking its locks leaves the disk as it found it.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ds_diffusers.config.schema import Config
from ds_diffusers.errors import ConfigError

LOCK_NAME = ".ds_diffusers.lock"
# A lock file with no readable content younger than this is being written by its holder right now.
_WRITING_GRACE_S = 10.0


@dataclass(frozen=True)
class RunLock:
    path: Path
    created: tuple[Path, ...]  # folders this lock created, deepest first


_held: list[RunLock] = []


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with the pid,
    it tells a live holder from a new process that reused a dead holder's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return started is None or _start_time(pid) in (None, started)


def _slurm_attempt() -> tuple[str | None, int]:
    """(job id, restart count) under Slurm; a requeued job keeps its id and counts its restarts."""
    return os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def _holder(lock_file: Path) -> dict | None:
    try:
        return json.loads(lock_file.read_text())
    except (OSError, ValueError):
        return None


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {since}"


def holder_if_live(folder: str) -> dict | None:
    """The live holder of `folder`'s lock, or None when it is free or its holder is gone (stale)."""
    lock_file = Path(folder) / LOCK_NAME
    if not lock_file.exists():
        return None
    holder = _holder(lock_file)
    if holder is None:
        try:
            young = time.time() - lock_file.stat().st_mtime < _WRITING_GRACE_S
        except FileNotFoundError:
            return None
        return {"host": "?", "pid": "?", "time": time.time()} if young else None
    job, restarts = _slurm_attempt()
    if job is not None and holder.get("slurm_job") == job and int(holder.get("slurm_restart", -1)) < restarts:
        return None  # an earlier attempt of this requeued job, possibly on another node
    if holder.get("host") != socket.gethostname():
        return holder  # cannot be checked from this host
    return holder if _alive(int(holder["pid"]), holder.get("started")) else None


def _busy_error(field: str, folder: str, holder: dict) -> ConfigError:
    return ConfigError(field, folder, f"another run is using this folder ({_describe(holder)}); wait for it to finish or "
                       f"choose another {field}; if that run is gone, delete {Path(folder) / LOCK_NAME}")


def check_not_locked(cfg: Config) -> None:
    """Every rank, before other checks: the clear message for a folder another live run holds."""
    for field in ("checkpoint_dir", "output_dir"):
        holder = holder_if_live(getattr(cfg, field))
        if holder is not None:
            raise _busy_error(field, getattr(cfg, field), holder)


def acquire(folder: str, field: str) -> RunLock:
    """Create `folder` if needed and take its lock; ConfigError when a live run holds it."""
    path = Path(folder).absolute()
    created = tuple(p for p in [path, *path.parents] if not p.exists())
    path.mkdir(parents=True, exist_ok=True)
    lock_file = path / LOCK_NAME
    job, restarts = _slurm_attempt()
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()), "time": time.time(),
              "slurm_job": job, "slurm_restart": restarts}
    for _ in range(3):
        try:
            handle = os.open(lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = holder_if_live(folder)
            if holder is not None:
                _remove_created(created)
                raise _busy_error(field, folder, holder) from None
            print(f"ds-diffusers: taking over the stale lock {lock_file} (its run is gone)", flush=True)
            lock_file.unlink(missing_ok=True)
            continue
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps(record))
        return RunLock(lock_file, created)
    raise ConfigError(field, folder, f"could not take the lock {lock_file}; another run keeps taking it; choose another {field}")


def _remove_created(created: tuple[Path, ...]) -> None:
    for folder in created:
        try:
            folder.rmdir()  # only when empty: a run that wrote something keeps it
        except OSError:
            return


def release(lock: RunLock) -> None:
    holder = _holder(lock.path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.path.unlink(missing_ok=True)
    _remove_created(lock.created)


def lock_run_folders(cfg: Config) -> ConfigError | None:
    """Rank 0: lock checkpoint_dir and output_dir (one lock when they are the same folder). Returns the
    refusal instead of raising, so the caller can tell the other ranks before anyone raises."""
    folders = {}
    for field in ("checkpoint_dir", "output_dir"):
        folders.setdefault(Path(getattr(cfg, field)).resolve(), (field, getattr(cfg, field)))
    try:
        for field, folder in folders.values():
            _held.append(acquire(folder, field))
    except ConfigError as err:
        release_all()
        return err
    return None


def release_all() -> None:
    """Release every lock this process holds (newest first); safe to call more than once."""
    while _held:
        release(_held.pop())


atexit.register(release_all)  # a safety net for exits that skip the entrypoint's finally
