"""Skip the optimizer steps a nan/inf gradient would spoil, with DeepSpeed's own overflow machinery.

Skipping is DeepSpeed's own mechanism wherever it has one: its optimizer wrappers set `overflow`,
and the engine then skips the update and the LR scheduler step and counts `engine.skipped_steps`.
Which check decides, per optimizer (DeepSpeed 0.19.8, `runtime/zero/stage3.py` and
`stage_1_and_2.py` `step()`):
- ZeRO-3, every dtype, and ZeRO-1/2 in fp32: the gradient norm the step computes anyway for
  clipping; DeepSpeed masks a nan/inf norm to -1 and `is_invalid_grad_norm` turns that into an
  overflow. Nothing of ours runs: a separate finiteness scan would read the whole gradient
  partition again (ZeRO-3 under fp16 still runs DeepSpeed's own scan, which its loss scaler needs);
- ZeRO-1/2 in bf16: `check_grad_overflow` (DeepSpeed's bf16 default, on);
- fp16 loss scaler and BF16_Optimizer (bf16 with fp32 accumulation): their own check, every step;
- a plain torch optimizer (stage 0, fp32; 16-bit runs never take stage 0, `engine.stage`): the one
  guard here, which replaces `engine.clip_fp32_gradients`.
The contract test checks that each engine skips a non-finite step and that no second scan runs.
"""

from __future__ import annotations

import types
from typing import Any

import torch


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm over all gradients, computed as DeepSpeed's `clip_grad_norm_` does (fp32 norm per
    tensor, squared, summed, root) but in one multi-tensor kernel instead of a Python loop. It is nan
    or inf when any element is, so it also answers whether the step may be applied."""
    return torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).pow(2).sum().pow(0.5)


def _guard_plain_optimizer(engine: Any) -> None:
    """A torch optimizer stepped by the engine directly (ZeRO-0, fp32). Its gradients were averaged
    over the ranks in the backward pass, so every rank sees the same ones and decides the same.

    One norm per step serves both the clipping and the skip decision. DeepSpeed's own clipping here
    (`engine.clip_fp32_gradients`) loops over the parameters in Python, twice, and all-reduces a norm
    every rank already has; with a finite check on top that was a tenth of the tiny model's CPU step.
    The replacement applies the same formula (coefficient max_norm / (norm + 1e-6), at most 1)."""
    optimizer = engine.optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    plain_step = optimizer.step
    clipped_norm: list[torch.Tensor] = []  # set by clip() in this step, read by step()

    def grads() -> list[torch.Tensor]:
        return [p.grad for p in params if p.grad is not None]

    def clip(self: Any) -> None:
        current = grads()
        if not current:
            return
        norm = grad_norm(current)
        clipped_norm.append(norm)
        coefficient = torch.clamp(self.gradient_clipping() / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(current, coefficient.to(current[0].dtype))

    def step(self: Any, closure: Any = None) -> Any:
        if clipped_norm:
            norm = clipped_norm.pop()
        else:  # gradient_clipping 0: the engine did not call clip()
            current = grads()
            norm = grad_norm(current) if current else torch.zeros(())
        self.overflow = not bool(norm.isfinite())
        if self.overflow:
            return None  # the engine zeroes the gradients and counts the skip
        return plain_step(closure)

    optimizer.overflow = False
    optimizer.step = types.MethodType(step, optimizer)
    engine.clip_fp32_gradients = types.MethodType(clip, engine)


def skip_nonfinite_steps(engine: Any) -> None:
    """Make the engine skip (not apply) optimizer steps whose gradients hold nan or inf. DeepSpeed's
    optimizers decide that already (see the module docstring); a plain torch optimizer gets a guard."""
    optimizer = engine.optimizer
    if not hasattr(optimizer, "overflow"):
        _guard_plain_optimizer(engine)


def optimizer_fp32_tensors(engine: Any) -> list[torch.Tensor]:
    """The non-empty fp32 tensors this rank's optimizer steps: the masters (or their partitions)
    under DeepSpeed's wrappers, the parameters themselves under a plain torch optimizer."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        # ZeRO-3 puts its flat fp32 partitions into the torch optimizer's groups only inside step().
        return [flat for flat in optimizer.fp32_partitioned_groups_flat if flat.numel()]
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wrappers keep the torch optimizer here
    return [p for group in inner.param_groups for p in group["params"] if p.numel()]
