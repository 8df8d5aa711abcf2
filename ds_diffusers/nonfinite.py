"""Non-finite losses and weights, as the user meets them: stop after too many skipped steps in a row
with the likely cause, and never write non-finite weights to a checkpoint or an export. (The steps
themselves are skipped by `engine.overflow`.)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ds_diffusers.distributed import all_gather, all_ranks_ok
from ds_diffusers.engine import optimizer_fp32_tensors
from ds_diffusers.errors import TrainingError


def master_weights_finite(engine: Any, device: torch.device) -> bool:
    """All ranks must call this. Every rank checks the fp32 master weights (or partitions) its
    optimizer holds; true only when they are finite on every rank."""
    tensors = optimizer_fp32_tensors(engine)
    finite = True
    if tensors:
        finite = bool(torch.stack([norm.to(device) for norm in torch._foreach_norm(tensors, float("inf"))]).isfinite().all())
    return all_ranks_ok(finite, device)


def check_weights_before_writing(engine: Any, device: torch.device, what: str, global_step: int) -> None:
    """All ranks must call this before a checkpoint or an export."""
    if not master_weights_finite(engine, device):
        raise TrainingError(f"the weights hold nan/inf at step {global_step}; no {what} was written from this state. "
                            "Resume from the last checkpoint with a lower optimizer.params.lr, warm-up "
                            "(lr_warmup_steps) or gradient_clipping (e.g. 1.0).")


# Above this, fp32 masters of a diffusion UNet (|w| well under 100 at any healthy point) have diverged.
_DIVERGED_WEIGHT = 1e4
_STEP_KEYS = "optimizer.params.lr, lr_warmup_steps, gradient_clipping (e.g. 1.0)"


def master_weights_largest(engine: Any, device: torch.device) -> float:
    """All ranks must call this. The largest |weight| among every rank's fp32 masters; inf when one
    of them is nan or inf."""
    tensors = optimizer_fp32_tensors(engine)
    largest = 0.0
    if tensors:
        norms = torch.stack([norm.to(device) for norm in torch._foreach_norm(tensors, float("inf"))])
        largest = float(norms.max()) if bool(norms.isfinite().all()) else math.inf
    return max(all_gather(largest))


def nonfinite_stop_message(run: int, global_step: int, epoch: int, fp16: bool, largest_weight: float) -> str:
    """Why training stops after `max_nonfinite_steps` non-finite losses in a row, and what to change:
    which of the weights or the loss went non-finite (the gradients of those steps follow from the
    loss and were skipped), judged from `largest_weight` (`master_weights_largest`)."""
    if not math.isfinite(largest_weight):
        what = "the weights hold nan/inf"
        causes = (f"an optimizer step wrote nan/inf into the weights: check optimizer.params (weight_decay, eps, "
                  f"betas) for extreme values, then {_STEP_KEYS}; resume from the last checkpoint")
    elif largest_weight > _DIVERGED_WEIGHT:
        what = f"the weights are finite but have diverged (largest |weight| {largest_weight:.3g})"
        causes = f"steps too large: lower {_STEP_KEYS}; resume from the last checkpoint"
    elif fp16:
        # The loss scale multiplies the gradients, not the forward pass: lowering it cannot help a
        # forward that overflows fp16's range (65504).
        what = f"the weights are finite (largest |weight| {largest_weight:.3g}), so the forward pass gives nan/inf"
        causes = ("the forward pass overflows fp16 (the loss scale only affects gradients, so changing "
                  "use_fp16.initial_scale_power does not help): use bf16.enabled (fp32's range) or fp32")
    else:
        what = f"the weights are finite (largest |weight| {largest_weight:.3g}), so the forward pass gives nan/inf"
        causes = ("input images with nan/inf pixels or extreme values (check the dataset), or the loss settings "
                  "(snr_gamma, noise_offset, input_perturbation)")
    return (f"loss is nan/inf at {run} optimizer steps in a row (up to step {global_step}, epoch {epoch}); those "
            f"steps were skipped and no weights were written from them. Non-finite: {what}. Likely causes: "
            f"{causes}. max_nonfinite_steps sets how many in a row are tolerated.")
