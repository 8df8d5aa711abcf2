"""Graceful stop on a signal (Slurm's `--signal=B:USR1@N` warning, SIGTERM from a scheduler).

The handler only sets a flag; the loop asks `stop_requested()` once per optimizer step, and the flag
is agreed across ranks (any rank signalled -> all stop at the same step), so every rank reaches the
collective checkpoint save together instead of one rank vanishing mid-step.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch

from ds_diffusers.distributed import any_rank

# EX_TEMPFAIL: the run is incomplete but saved; the caller is invited to start it again (requeue).
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: list[int] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


def install() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handler)


def stop_requested(device: torch.device) -> bool:
    """All ranks must call this (one small all-reduce)."""
    return any_rank(bool(_received), device)


def signal_names() -> str:
    return ", ".join(signal.Signals(s).name for s in _received) or "a peer rank's signal"
