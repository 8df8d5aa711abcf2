"""Non-finite losses and weights, as the user meets them: stop after too many skipped steps in a row
with the likely cause, and never write non-finite weights to a checkpoint or an export. (The steps
themselves are skipped by `engine.overflow`.)
"""

from __future__ import annotations

from typing import Any

import torch

from ds_diffusers.distributed import all_ranks_ok
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


def nonfinite_stop_message(run: int, global_step: int, epoch: int, fp16: bool) -> str:
    """Why training stops after `max_nonfinite_steps` non-finite losses in a row, and what to change."""
    if fp16:
        # The loss scale multiplies the gradients, not the forward pass: lowering it cannot help a
        # forward that overflows fp16's range (65504).
        causes = ("the forward pass overflows fp16 (the loss scale only affects gradients, so changing "
                  "use_fp16.initial_scale_power does not help): use bf16.enabled (fp32's range) or fp32, or lower "
                  "optimizer.params.lr / add lr_warmup_steps / set gradient_clipping (e.g. 1.0) if the weights diverged")
    else:
        causes = ("learning rate too high (lower optimizer.params.lr, add lr_warmup_steps or set gradient_clipping, "
                  "e.g. 1.0), or corrupt input images")
    return (f"loss is nan/inf at {run} optimizer steps in a row (up to step {global_step}, epoch {epoch}); those "
            f"steps were skipped and no weights were written from them. Likely causes: {causes}. "
            "max_nonfinite_steps sets how many in a row are tolerated.")
