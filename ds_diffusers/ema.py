"""Exponential moving average of the trainable UNet weights that stays right under ZeRO-3.

Each rank keeps the EMA of what it holds: under ZeRO-3 the local partition of every parameter
(`param.ds_tensor`), never the empty placeholder `param.data`; under ZeRO-0/1/2 the full parameter.
Shadows are fp32. Exports all-gather the partitions, so the result equals an EMA computed without ZeRO.
"""

from __future__ import annotations

from typing import Any

import torch


def _local(param: torch.nn.Parameter) -> torch.Tensor:
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float, update_after_step: int) -> None:
        self.names = [name for name, param in module.named_parameters() if param.requires_grad]
        self.params = [param for param in module.parameters() if param.requires_grad]
        self.decay = decay
        self.update_after_step = update_after_step
        self.shadow = [_local(param).detach().float().clone() for param in self.params]

    def decay_at(self, global_step: int) -> float:
        """As diffusers' EMAModel: plain copies until `update_after_step`, then
        min(decay, (1 + k) / (10 + k)) with k the steps since, so early averages are not stuck at init."""
        k = global_step - self.update_after_step
        if k <= 0:
            return 0.0
        return min(self.decay, (1 + k) / (10 + k))

    @torch.no_grad()
    def update(self, global_step: int) -> None:
        """Local work only; call after each optimizer step on every rank."""
        weight = 1.0 - self.decay_at(global_step)
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(_local(param).float(), weight)

    def state_dict(self) -> dict[str, Any]:
        return {"names": self.names, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["names"] != self.names or any(a.shape != b.shape for a, b in zip(state["shadow"], self.shadow)):
            raise ValueError("EMA state does not match the model's trainable parameters")
        for shadow, saved in zip(self.shadow, state["shadow"]):
            shadow.copy_(saved)

    @torch.no_grad()
    def gathered(self, rank: int) -> dict[str, torch.Tensor]:
        """All ranks must call this. Full fp32 EMA tensors on rank 0, an empty dict elsewhere."""
        out: dict[str, torch.Tensor] = {}
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        for name, param, shadow in zip(self.names, self.params, self.shadow):
            if hasattr(param, "ds_tensor"):
                parts = [torch.empty_like(shadow) for _ in range(world)]
                torch.distributed.all_gather(parts, shadow)
                full = torch.cat(parts)[: param.ds_numel].view(param.ds_shape)
            else:
                full = shadow
            if rank == 0:
                out[name] = full.detach().cpu().clone()
        return out
