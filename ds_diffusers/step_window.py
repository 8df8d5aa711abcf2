"""The loss and health of the optimizer steps between two log points, kept on the device.

Reading a loss (`.item()`) or reducing it across ranks makes the host wait for the accelerator, so
doing it every micro-step stalls the queue of kernels the host could already launch. Here every
micro-batch adds to device tensors only; at a log point (every `log_every_n_steps` optimizer steps,
at save points, at the end) one all-reduce carries [loss sum, finite count, stop flag, non-finite
count per step] of every rank, and one device-to-host copy brings it back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ds_diffusers.distributed import sum_over_ranks


@dataclass(frozen=True)
class WindowStats:
    """What all ranks agree on at a log point."""

    steps: int  # optimizer steps since the previous log point
    mean_loss: float  # mean of the finite micro-batch losses, over ranks, accumulation and steps; nan if none
    nonfinite_losses: int  # micro-batch losses (all ranks) that were nan or inf
    longest_nonfinite_run: int  # most optimizer steps in a row with a non-finite loss on some rank, up to here
    stop_requested: bool  # a stop signal reached at least one rank


class StepWindow:
    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self._capacity = max(1, capacity)
        self._run = 0  # non-finite steps in a row at the end of the previous window
        self._reset()

    def _reset(self) -> None:
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        self._loss_sum = zero.clone()
        self._finite = zero.clone()
        self._nonfinite_now = zero.clone()  # in the accumulation window of the step in progress
        self._nonfinite_per_step = torch.zeros(self._capacity, dtype=torch.float32, device=self.device)
        self._steps = 0

    @torch.no_grad()
    def add_micro_batch(self, loss: torch.Tensor) -> None:
        """Local device work only, no host read."""
        loss = loss.detach().float().reshape(())
        finite = torch.isfinite(loss)
        self._loss_sum += torch.where(finite, loss, torch.zeros_like(loss))
        self._finite += finite
        self._nonfinite_now += ~finite

    def end_optimizer_step(self) -> None:
        """Call once per optimizer step (accumulation boundary), after its micro-batches."""
        if self._steps == self._nonfinite_per_step.numel():
            self._nonfinite_per_step = torch.cat([self._nonfinite_per_step, torch.zeros_like(self._nonfinite_per_step)])
        self._nonfinite_per_step[self._steps] = self._nonfinite_now
        self._nonfinite_now.zero_()
        self._steps += 1

    def sync(self, stop_requested: bool) -> WindowStats:
        """All ranks must call this, at the same optimizer step: the window's one collective."""
        stop = torch.tensor([1.0 if stop_requested else 0.0], device=self.device)
        packed = torch.cat([self._loss_sum.reshape(1), self._finite.reshape(1), stop,
                            self._nonfinite_per_step[: self._steps]])
        loss_sum, finite, stops, *per_step = sum_over_ranks(packed).cpu().tolist()
        longest = self._run
        for count in per_step:
            self._run = self._run + 1 if count > 0 else 0
            longest = max(longest, self._run)
        stats = WindowStats(steps=self._steps, mean_loss=loss_sum / finite if finite else math.nan,
                            nonfinite_losses=int(sum(per_step)), longest_nonfinite_run=longest,
                            stop_requested=stops > 0)
        self._reset()
        return stats
