"""Faults injected into real training processes from outside the production code.

A test sets `DSD_FAULT_INJECT=<fault>:<step>` and puts this folder first on `PYTHONPATH`; every
Python process started under it (the `deepspeed` launcher's ranks, `srun`'s tasks in a `.slurm` job)
then runs `sitecustomize.py`, which patches the named production function as its module is imported
(`dsd_faults.py` says which). The production modules hold no test hooks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from tests.fault_injection.dsd_faults import FAULT_ENV, parse_fault

SITE_DIR = Path(__file__).resolve().parent


def environment(fault: str) -> dict[str, str]:
    """The variables that inject `fault` (e.g. "kill_after_save:3") into a process started with them."""
    parse_fault(fault)  # a misspelt fault fails here, not as a run that silently goes through
    python_path = os.pathsep.join(part for part in (str(SITE_DIR), os.environ.get("PYTHONPATH")) if part)
    return {FAULT_ENV: fault, "PYTHONPATH": python_path}


@contextlib.contextmanager
def injected(fault: str) -> Iterator[None]:
    """Processes started inside this block (they inherit os.environ) get `fault`."""
    saved = {name: os.environ.get(name) for name in (FAULT_ENV, "PYTHONPATH")}
    os.environ.update(environment(fault))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
