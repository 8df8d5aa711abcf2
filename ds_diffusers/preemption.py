"""Graceful stop on a signal (Slurm's `--signal=B:USR1@N` warning, SIGTERM from a scheduler).

The handler only sets a flag; the loop asks `stop_requested()` once per optimizer step, and the flag
is agreed across ranks (any rank signalled -> all stop at the same step), so every rank reaches the
collective checkpoint save together instead of one rank vanishing mid-step.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch

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
    flag = torch.tensor([1.0 if _received else 0.0], device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def signal_names() -> str:
    return ", ".join(signal.Signals(s).name for s in _received) or "a peer rank's signal"
