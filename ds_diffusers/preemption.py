"""Graceful stop on a signal (Slurm's `--signal=B:USR1@N` warning, SIGTERM from a scheduler, Ctrl-C).

The handler only sets a flag. The loop reads it locally (`signalled()`, no collective) and sends it
with the loss sums in the one all-reduce of each log point (see `step_window`), so the ranks agree
on the stop (any rank signalled -> all stop at the same step) without a collective of its own, and
every rank reaches the collective checkpoint save together instead of one vanishing mid-step.
"""

from __future__ import annotations

import signal
from types import FrameType

# EX_TEMPFAIL: the run is incomplete but saved; the caller is invited to start it again (requeue).
EXIT_PREEMPTED = 75
# 128 + SIGINT, the shell's code for Ctrl-C: stopped by the user (saved, or a save abandoned by a
# second Ctrl-C); distinct from 75 so that a requeue wrapper does not restart what the user stopped.
EXIT_INTERRUPTED = 130
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

_received: list[int] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGINT and signal.SIGINT in _received:
        # A second Ctrl-C: the user will not wait for the save; `checkpoint.save` removes its partial
        # folder on the way out and the entrypoint says so in one line.
        raise KeyboardInterrupt
    _received.append(signum)


def install() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handler)


def signalled(global_step: int, rank: int) -> bool:
    """Whether this process got a stop signal; local, no collective."""
    return bool(_received)


def exit_code() -> int:
    """The code for a stop after its save: 130 when the user pressed Ctrl-C, 75 (start again) otherwise."""
    return EXIT_INTERRUPTED if signal.SIGINT in _received else EXIT_PREEMPTED


def signal_names() -> str:
    return ", ".join(signal.Signals(s).name for s in _received) or "a peer rank's signal"
