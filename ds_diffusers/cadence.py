"""When the loop logs and when it makes validation images: each decided here, in one place. (When
it saves is `checkpoint_manager`'s.) Pure step arithmetic, the same on every rank."""

from __future__ import annotations

from typing import Callable


class LogCadence:
    """Log points: the run's first step (also a resumed run's), every `every_n_steps`, the last step,
    and every step `also_at` names (the save steps). A log point is the one collective that reads
    the loss and the stop signals, so a stop seen there is saved by that step's save, once."""

    def __init__(self, every_n_steps: int, *, first_step: int, last_step: int, also_at: Callable[[int], bool]) -> None:
        self.every_n_steps = every_n_steps
        self.first_step = first_step
        self.last_step = last_step
        self.also_at = also_at

    def should_run(self, step: int) -> bool:
        return (step == self.first_step or step % self.every_n_steps == 0 or step >= self.last_step
                or self.also_at(step))


class ValidationCadence:
    """Validation images every `every_n_steps` optimizer steps, at the end of every
    `every_n_epochs`-th epoch, and at the end of a run that validates at all; the last two not
    again for a step that already has them. 0 turns a cadence off."""

    def __init__(self, every_n_steps: int, every_n_epochs: int) -> None:
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.done_at = -1  # the step whose images this process made last

    def should_run(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def should_run_at_epoch_end(self, epoch: int, step: int) -> bool:
        return bool(self.every_n_epochs) and (epoch + 1) % self.every_n_epochs == 0 and self.done_at != step

    def should_run_at_end(self, step: int) -> bool:
        return bool(self.every_n_steps or self.every_n_epochs) and self.done_at != step

    def ran(self, step: int) -> None:
        self.done_at = step
