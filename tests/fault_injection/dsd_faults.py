"""The faults, each a wrapper around one production function, patched in as its module is imported.

    kill_during_save:<step>    DeepSpeedEngine.save_checkpoint: SIGKILL rank 0 once the engine files of
                               step_<step> are written, before the rest of that checkpoint (a lost rank)
    enospc_during_save:<step>  DeepSpeedEngine.save_checkpoint: every rank raises what torch's zip
                               writer raises on a full disk, after step_<step>'s engine files
    sigint_during_save:<step>  DeepSpeedEngine.save_checkpoint: rank 0 sends itself SIGINT once the engine
                               files of step_<step> are written (Ctrl-C during a save)
    sigint_twice_during_save:<step>  the same, twice (a user who will not wait for the save)
    kill_after_save:<step>     ds_diffusers.checkpoint.save: SIGKILL rank 0 once the checkpoint of
                               step <step> is complete (a crash resumable from it)
    usr1_at_step:<step>        ds_diffusers.preemption.signalled: rank 0 sends itself SIGUSR1 at that
                               optimizer step, so the real handler takes it
    record_samples:0           ds_diffusers.run_plan.epoch_batches: each rank appends the sample ids of
                               every micro-batch it trains on to $DSD_RECORD_DIR/rank_<R>.jsonl (not a
                               fault: a probe, for the resume tests' "no sample twice, none skipped")

Imported both as the top-level `dsd_faults` (by sitecustomize, in a started process) and as
`tests.fault_injection.dsd_faults` (in-process tests), so it imports nothing of its own folder.
Nothing heavy is imported until a patched module is: sitecustomize runs in every Python process.
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

FAULT_ENV = "DSD_FAULT_INJECT"
# What torch's zip writer raises when the disk fills up under it.
FULL_DISK_ERROR = "[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4032"


def parse_fault(fault: str) -> tuple[str, int]:
    name, _, step = fault.partition(":")
    if name not in PATCHES or not step.isdigit():
        raise ValueError(f"{FAULT_ENV}={fault!r}: expected <fault>:<step> with fault one of {', '.join(sorted(PATCHES))}")
    return name, int(step)


def _rank() -> int:
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fail_engine_save(save_checkpoint: Callable[..., Any], fault: str, step: int) -> Callable[..., Any]:
    """`save_checkpoint(self, save_dir, tag, ...)` (DeepSpeed's or a test's stand-in) that writes as
    before, then fails as `fault` says when `tag` is step `step`'s."""

    @functools.wraps(save_checkpoint)
    def save_then_fail(self: Any, save_dir: Any, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        result = save_checkpoint(self, save_dir, tag, *args, **kwargs)
        if tag == f"step_{step}":
            if fault == "kill_during_save" and _rank() == 0:
                _kill_self()
            if fault in ("sigint_during_save", "sigint_twice_during_save") and _rank() == 0:
                for _ in range(2 if fault == "sigint_twice_during_save" else 1):
                    os.kill(os.getpid(), signal.SIGINT)  # through the real handler, as a terminal's Ctrl-C
            if fault == "enospc_during_save":
                raise RuntimeError(FULL_DISK_ERROR)
        return result

    return save_then_fail


def _patch_engine(module: ModuleType, fault: str, step: int) -> None:
    engine_class = module.DeepSpeedEngine
    engine_class.save_checkpoint = fail_engine_save(engine_class.save_checkpoint, fault, step)


def _patch_checkpoint_save(module: ModuleType, fault: str, step: int) -> None:
    save = module.save

    @functools.wraps(save)
    def save_then_kill(*args: Any, **kwargs: Any) -> Any:
        step_dir = save(*args, **kwargs)  # every rank returns the complete step folder
        if Path(step_dir).name == f"step_{step}" and _rank() == 0:
            _kill_self()
        return step_dir

    module.save = save_then_kill


def _patch_signalled(module: ModuleType, fault: str, step: int) -> None:
    signalled = module.signalled

    @functools.wraps(signalled)
    def signal_then_check(global_step: int, rank: int) -> bool:
        if rank == 0 and global_step == step:
            os.kill(os.getpid(), signal.SIGUSR1)  # a real signal through the real handler
        return signalled(global_step, rank)

    module.signalled = signal_then_check


def _patch_epoch_batches(module: ModuleType, fault: str, step: int) -> None:
    epoch_batches = module.epoch_batches

    @functools.wraps(epoch_batches)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        import json

        record = Path(os.environ["DSD_RECORD_DIR"]) / f"rank_{_rank()}.jsonl"
        for epoch, batch in epoch_batches(*args, **kwargs):
            if batch is not None:
                with open(record, "a") as handle:
                    handle.write(json.dumps({"epoch": epoch, "ids": batch["index"].tolist()}) + "\n")
            yield epoch, batch

    module.epoch_batches = recorded


# fault -> (module, the name in it that is patched, the patch). The names are all this seam relies on;
# tests/test_checkpoint_faults.py checks that they still exist.
PATCHES: dict[str, tuple[str, str, Callable[[ModuleType, str, int], None]]] = {
    "kill_during_save": ("deepspeed.runtime.engine", "DeepSpeedEngine.save_checkpoint", _patch_engine),
    "enospc_during_save": ("deepspeed.runtime.engine", "DeepSpeedEngine.save_checkpoint", _patch_engine),
    "sigint_during_save": ("deepspeed.runtime.engine", "DeepSpeedEngine.save_checkpoint", _patch_engine),
    "sigint_twice_during_save": ("deepspeed.runtime.engine", "DeepSpeedEngine.save_checkpoint", _patch_engine),
    "kill_after_save": ("ds_diffusers.checkpoint", "save", _patch_checkpoint_save),
    "usr1_at_step": ("ds_diffusers.preemption", "signalled", _patch_signalled),
    "record_samples": ("ds_diffusers.run_plan", "epoch_batches", _patch_epoch_batches),
}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds `module_name` with the other finders and runs `patch` on it right after it executes,
    before any other module can take a reference to the function it replaces."""

    def __init__(self, module_name: str, patch: Callable[[ModuleType], None]) -> None:
        self.module_name = module_name
        self.patch = patch

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != self.module_name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        sys.meta_path.remove(self)  # once
        execute = spec.loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            execute(module)
            self.patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install(fault: str) -> None:
    """Patch the function `fault` needs, now if its module is loaded, else as it is imported."""
    name, step = parse_fault(fault)
    module_name, _, patch = PATCHES[name]
    if module_name in sys.modules:
        patch(sys.modules[module_name], name, step)
    else:
        sys.meta_path.insert(0, _PatchOnImport(module_name, lambda module: patch(module, name, step)))
