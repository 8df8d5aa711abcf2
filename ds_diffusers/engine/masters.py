"""The fp32 master weights of the trainable parameters, wherever DeepSpeed keeps them.

Under fp16/bf16 the module holds a 16-bit compute copy; the optimizer updates fp32 masters and
casts them into that copy after each step. EMA and exports read the masters, never the copy.
Where they live, per engine:
- ZeRO-3: each rank holds one equal-sized partition of every parameter, in the optimizer's flat fp32
  groups (on the host under optimizer offload, and read there: no copy to the accelerator);
- ZeRO-1/2 and the bf16 optimizer: each rank holds a fragment of the flat fp32 partition
  (`param._hp_mapping`, what `safe_get_full_fp32_param` reassembles);
- stage 0 with fp16/bf16: the FP16 optimizer wrappers keep a full fp32 copy per parameter;
- stage 0 in fp32: the parameter is its own master.
Each rank sees a list of (1-D fp32 slice, offset into the flattened parameter); `gather_full`
reassembles full tensors on rank 0, and `computing_with` lets the module compute with other values
laid out the same way (the EMA) for a while.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ds_diffusers.engine.params import (full_numel, full_shape, is_zero3_param, local_partition, partition_numel,
                                        regather_held)

Slice = tuple[torch.Tensor, int]


def _stage0_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """id(param) -> its fp32 master, for DeepSpeed's FP16_UnfusedOptimizer / FP16_Optimizer."""
    masters: dict[int, torch.Tensor] = {}
    if hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):
        for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            masters.update({id(p): m.view(-1) for p, m in zip(low, high)})
    elif hasattr(optimizer, "fp32_groups_flat") and hasattr(optimizer, "fp16_groups"):
        for low, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat):
            offset = 0  # the flat buffer is the plain concatenation of the group's parameters
            for p in low:
                masters[id(p)] = flat.narrow(0, offset, p.numel())
                offset += p.numel()
    return masters


def place_slice(full: torch.Tensor, local: torch.Tensor, start: int) -> None:
    """Copy a rank's 1-D slice into the flattened parameter `full` at `start`; ZeRO-3 pads the last
    partition past the parameter's end, and that padding is dropped."""
    length = max(0, min(local.numel(), full.numel() - start))
    full[start:start + length] = local[:length].to(full.device)


def _zero3_partition(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's fp32 partition of a ZeRO-3 parameter: a view of its optimizer's flat fp32 group,
    found as DeepSpeed's `get_local_fp32_param` finds it but without that method's copy to the
    accelerator, so under optimizer offload it stays on the host (a per-step host-to-device copy of
    every partition otherwise, and an EMA shadow on the accelerator). A sub-group swapped out to NVMe
    has no storage between steps: DeepSpeed's getter swaps it in and this returns its copy
    (`use_ema` refuses NVMe offload, `config.checks`; exports read the copy once)."""
    optimizer = p._z3_optimizer
    group, offset, numel = optimizer.grad_position[optimizer.get_param_id(p)]
    if optimizer._swappable_optimizer_subgroup(group):
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p).view(-1)
    return optimizer.fp32_partitioned_groups_flat[group].detach().narrow(0, offset, numel)  # the flat tensor requires grad


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class MasterWeights:
    """Per-rank view of the trainable parameters' fp32 masters of one DeepSpeed engine."""

    def __init__(self, engine: Any) -> None:
        named = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = engine.optimizer
        self.rank, world = _world()
        # Partitioned: a rank holds only part of each master, so full tensors need a collective.
        self.partitioned = world > 1 and any(is_zero3_param(p) or hasattr(p, "_hp_mapping") for p in self.params)
        # ZeRO-1/2: each rank computes with full parameters but holds only fragments of the masters.
        self.fragmented = self.partitioned and not is_zero3_param(self.params[0])

    def numel(self, param: torch.nn.Parameter) -> int:
        return full_numel(param)

    def shape(self, param: torch.nn.Parameter) -> torch.Size:
        return full_shape(param)

    def local(self) -> list[Slice]:
        """This rank's fp32 master slices, views into the optimizer's own storage, where it keeps
        them (no copies, except of a ZeRO-3 partition swapped out to NVMe, see `_zero3_partition`)."""
        stage0: dict[int, torch.Tensor] = {}
        return [self._local_slice(p) if is_zero3_param(p) else self._view(p, stage0) for p in self.params]

    def _view(self, p: torch.nn.Parameter, stage0: dict[int, torch.Tensor]) -> Slice:
        """A parameter's master outside ZeRO-3, as a view the optimizer steps; `stage0` memoises the
        stage-0 wrappers' masters over one pass (filled on first need)."""
        if hasattr(p, "_hp_mapping") or (p.dtype == torch.float32 and not hasattr(self.optimizer, "fp16_groups")):
            return self._local_slice(p)
        if not stage0:
            stage0.update(_stage0_masters(self.optimizer))
        if id(p) not in stage0:
            raise RuntimeError(f"no fp32 master weight found for a {p.dtype} parameter under "
                               f"{type(self.optimizer).__name__}")
        return stage0[id(p)], 0

    def _local_slice(self, p: torch.nn.Parameter) -> Slice:
        if is_zero3_param(p):
            # ZeRO-3 partitions are equal-sized; rank r holds [r * size, (r + 1) * size).
            return _zero3_partition(p), self.rank * partition_numel(p)
        if hasattr(p, "_hp_mapping"):
            mapping = p._hp_mapping
            if mapping is None:  # no fragment of this parameter on this rank
                return torch.empty(0, dtype=torch.float32, device=p.device), 0
            return mapping.hp_fragment.view(-1), mapping.lp_fragment_address.start
        return p.data.view(-1), 0

    @torch.no_grad()
    def write_full(self, full_value: Any) -> None:
        """All ranks. Overwrite every trainable parameter's fp32 master with `full_value(name)` (the
        full fp32 tensor); each rank writes the part it holds. The 16-bit compute copy is left as it
        is: it already holds these values rounded."""
        from deepspeed.utils import safe_set_local_fp32_param

        stage0: dict[int, torch.Tensor] = {}
        for name, p in zip(self.names, self.params):
            full = full_value(name).reshape(-1)
            if is_zero3_param(p):
                # DeepSpeed's setter, not a copy into `_zero3_partition`: it also swaps a sub-group
                # offloaded to NVMe in and out (this runs once, at start-up, whatever the offload).
                size = partition_numel(p)
                start = self.rank * size
                partition = torch.zeros(size, dtype=torch.float32)
                length = max(0, min(size, full.numel() - start))  # the last partition is padded
                partition[:length] = full[start:start + length]
                safe_set_local_fp32_param(p, partition)
                continue
            master, start = self._view(p, stage0)
            master.copy_(full[start:start + master.numel()])

    def _full_flat(self, p: torch.nn.Parameter, local: torch.Tensor, start: int) -> torch.Tensor:
        """All ranks must call this when partitioned. The flattened full fp32 parameter from every
        rank's `(local, start)`: a new tensor on the accelerator when partitioned (NCCL cannot reduce
        CPU tensors, which is where offloaded masters live; only this one parameter goes there), else
        `local` itself. The fp32 bits travel as int32 and are summed with zeros, so every value, -0.0
        included, arrives unchanged."""
        from deepspeed.accelerator import get_accelerator

        numel = self.numel(p)
        if not self.partitioned:
            return local.narrow(0, 0, numel)  # a one-rank ZeRO-3 partition may be padded
        full = torch.zeros(numel, dtype=torch.float32, device=get_accelerator().current_device_name())
        place_slice(full, local, start)
        torch.distributed.all_reduce(full.view(torch.int32))
        return full

    @torch.no_grad()
    def gather_full(self, slices: list[Slice]) -> dict[str, torch.Tensor]:
        """All ranks must call this when partitioned. Full fp32 CPU tensors by name on rank 0, an empty
        dict elsewhere; one parameter at a time."""
        out: dict[str, torch.Tensor] = {}
        for name, p, (local, start) in zip(self.names, self.params, slices):
            full = self._full_flat(p, local, start)
            if self.rank == 0:
                out[name] = full.view(self.shape(p)).detach().cpu().clone()
        return out

    @contextmanager
    def computing_with(self, slices: list[Slice]) -> Iterator[None]:
        """All ranks must enter this. Inside, the module computes with `slices` (fp32, laid out as
        `local()` lays out the masters: an EMA) cast to the compute dtype; on exit the compute copy
        holds its values again, bit for bit. One parameter at a time, so beyond what this rank keeps
        of the compute copy it costs about one full fp32 parameter:
        - ZeRO-1/2 and the bf16 optimizer (`_hp_mapping`): every rank computes with full parameters
          but holds fragments, so each parameter is assembled and cast in; on exit it is rebuilt the
          same way from the masters, since the compute copy is the masters cast (DeepSpeed copies its
          fp32 partitions into the 16-bit ones after every step and on load; the contract test pins
          it). Nothing is cloned.
        - ZeRO-3: the rank's partitions are written (their old values kept: a 1/N share), and the
          parameters ZeRO-3 keeps gathered (persistent ones) are gathered again, in and out.
        - stage 0: the parameter (fp32) is its own master, so its old values are kept."""
        targets = [local_partition(p) for p in self.params]
        kept = [None if hasattr(p, "_hp_mapping") else t.detach().clone() for p, t in zip(self.params, targets)]
        with torch.no_grad():
            for p, target, values in zip(self.params, targets, slices):
                self._cast_into(p, target, values)
        regather_held(self.params)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, target, old, master in zip(self.params, targets, kept, self.local()):
                    if old is None:
                        self._cast_into(p, target, master)
                    else:
                        target.copy_(old)
            regather_held(self.params)

    def _cast_into(self, p: torch.nn.Parameter, target: torch.Tensor, values: Slice) -> None:
        """All ranks when partitioned. A ZeRO-3 partition takes this rank's own slice; a full
        parameter the slices of all ranks, assembled."""
        local, start = values
        if is_zero3_param(p):
            target.copy_(local)
        else:
            target.copy_(self._full_flat(p, local, start).view(target.shape))


class StartingValues:
    """The fp32 values the trainable parameters start from, kept for the optimizer's masters.

    `deepspeed.initialize` casts a 16-bit run's module before its optimizer clones the fp32 masters,
    so the masters (and EMA's starting point, and the export of a short run) would start from
    rounded weights; under ZeRO-3's partitioned load the parameters never held fp32 values at all.
    `capture` runs before `initialize`: it holds (does not copy) the fp32 tensors of the ordinary
    parameters, since the engine's cast rebinds `param.data` and leaves them intact, and for the
    parameters zero.Init built already partitioned it keeps the safetensors file they were filled
    from (`unet_weight_files`, tensor name -> file), to read one tensor at a time. `write_into` puts
    them into the masters after `initialize`."""

    def __init__(self, held: dict[str, torch.Tensor], files: dict[str, Any]) -> None:
        self.held = held
        self.files = files

    @classmethod
    def capture(cls, module: torch.nn.Module, unet_weight_files: dict[str, Any] | None) -> "StartingValues":
        held, files = {}, {}
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if is_zero3_param(p):
                if unet_weight_files is None or name not in unet_weight_files:
                    raise RuntimeError(f"{name} was built partitioned but is not in the UNet's safetensors files")
                files[name] = unet_weight_files[name]
            else:
                held[name] = p.data
        return cls(held, files)

    def full(self, name: str) -> torch.Tensor:
        if name in self.held:
            return self.held[name]
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name).float()

    def write_into(self, engine: Any) -> None:
        """All ranks, once, right after `deepspeed.initialize` and before anything reads the masters."""
        MasterWeights(engine).write_full(self.full)
        self.held, self.files = {}, {}
