"""Exponential moving average of the trainable UNet weights, taken over the fp32 master weights.

Averaging the 16-bit compute copy would lose every update smaller than its rounding step (bf16 keeps
8 bits), which at a decay of 0.9999 is nearly all of them. Each rank averages the part of the masters
it holds (`engine.MasterWeights`): the full parameters under ZeRO-0, its fragments under ZeRO-1/2,
its partitions under ZeRO-3, so the EMA costs no communication per step and stays sharded like the
optimizer, on the optimizer's device (the host under optimizer offload, where it is also updated).
Exports reassemble it; the result equals an EMA computed without ZeRO.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ds_diffusers.engine import MasterWeights


def ema_decay(step: int, *, decay: float, update_after_step: int) -> float:
    """diffusers' `EMAModel.get_decay` with its defaults (use_ema_warmup=False, min_decay=0):
    plain copies until `update_after_step` + 1, then min(decay, (1 + k) / (10 + k)) with
    k = step - update_after_step - 1, so early averages are not stuck at the initial weights."""
    k = max(0, step - update_after_step - 1)
    if k <= 0:
        return 0.0
    return min(decay, (1 + k) / (10 + k))


class ShardedEMA:
    def __init__(self, engine: Any, decay: float, update_after_step: int) -> None:
        self.masters = MasterWeights(engine)
        self.names = self.masters.names
        self.decay = decay
        self.update_after_step = update_after_step
        local = self.masters.local()
        self.starts = [start for _, start in local]
        self.shadow = [master.detach().clone() for master, _ in local]

    def decay_at(self, global_step: int) -> float:
        return ema_decay(global_step, decay=self.decay, update_after_step=self.update_after_step)

    @torch.no_grad()
    def update(self, global_step: int) -> None:
        """Local work only; call after each optimizer step (`global_step` counts it) on every rank."""
        masters = [master for master, _ in self.masters.local()]
        # One fused kernel per dtype/device group instead of one launch (and a temporary) per parameter.
        torch._foreach_lerp_(self.shadow, masters, 1.0 - self.decay_at(global_step))

    def state_dict(self) -> dict[str, Any]:
        return {"names": self.names, "starts": self.starts, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["names"] != self.names or state.get("starts", self.starts) != self.starts
                or any(a.shape != b.shape for a, b in zip(state["shadow"], self.shadow))):
            raise ValueError("EMA state does not match the model's trainable parameters")
        torch._foreach_copy_(self.shadow, [saved.to(s.device) for saved, s in zip(state["shadow"], self.shadow)])

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """This rank's slices of full EMA tensors (by name): a checkpoint saved on another topology,
        reassembled by `checkpoint_reader.read_ema`. A ZeRO-3 partition past the parameter's end
        (padding) is zero."""
        for index, name in enumerate(self.names):
            flat, start, shadow = full[name].reshape(-1), self.starts[index], self.shadow[index]
            length = max(0, min(shadow.numel(), flat.numel() - start))
            shadow.zero_()
            shadow[:length].copy_(flat[start:start + length].to(shadow.device))

    def gathered(self, rank: int) -> dict[str, torch.Tensor]:
        """All ranks must call this. Full fp32 EMA tensors on rank 0, an empty dict elsewhere."""
        del rank  # the masters know it
        return self.masters.gather_full(list(zip(self.shadow, self.starts)))

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """All ranks must enter this. Inside it the module computes with the EMA weights (cast to the
        compute dtype), every parameter of it; on exit the compute copy (which in fp32 at stage 0 is
        the master) is restored bit for bit. Parameter by parameter (`MasterWeights.computing_with`):
        no rank assembles the whole EMA, and under ZeRO-1/2 none clones its compute copy."""
        with self.masters.computing_with(list(zip(self.shadow, self.starts))):
            yield
