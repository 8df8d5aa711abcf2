"""The fp32 master weights of the trainable parameters, wherever DeepSpeed keeps them.

Under fp16/bf16 the module holds a 16-bit compute copy; the optimizer updates fp32 masters and
casts them into that copy after each step. EMA and exports read the masters, never the copy.
Where they live, per engine:
- ZeRO-3: each rank holds one equal-sized partition of every parameter (`safe_get_local_fp32_param`);
- ZeRO-1/2 and the bf16 optimizer: each rank holds a fragment of the flat fp32 partition
  (`param._hp_mapping`, what `safe_get_full_fp32_param` reassembles);
- stage 0 with fp16/bf16: the FP16 optimizer wrappers keep a full fp32 copy per parameter;
- stage 0 in fp32: the parameter is its own master.
Each rank sees a list of (1-D fp32 slice, offset into the flattened parameter); `gather_full`
reassembles full tensors on rank 0.
"""

from __future__ import annotations

from typing import Any

import torch

from ds_diffusers.engine.params import full_numel, full_shape, is_zero3_param, partition_numel

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
        """This rank's fp32 master slices, views into the optimizer's own storage (no copies except
        where DeepSpeed's ZeRO-3 API moves an offloaded partition to the accelerator)."""
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
        from deepspeed.utils import safe_get_local_fp32_param

        if is_zero3_param(p):
            # ZeRO-3 partitions are equal-sized; rank r holds [r * size, (r + 1) * size).
            return safe_get_local_fp32_param(p).view(-1), self.rank * partition_numel(p)
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
                # DeepSpeed's setter, not a copy into safe_get_local_fp32_param's result: under
                # optimizer offload that is a copy on the accelerator, not the host partition.
                size = partition_numel(p)
                start = self.rank * size
                partition = torch.zeros(size, dtype=torch.float32)
                length = max(0, min(size, full.numel() - start))  # the last partition is padded
                partition[:length] = full[start:start + length]
                safe_set_local_fp32_param(p, partition)
                continue
            master, start = self._view(p, stage0)
            master.copy_(full[start:start + master.numel()])

    @torch.no_grad()
    def gather_full(self, slices: list[Slice], *, to_all: bool = False) -> dict[str, torch.Tensor]:
        """All ranks must call this when partitioned. Full fp32 tensors by name on rank 0 (on every
        rank with `to_all`); an empty dict elsewhere. Collectives run on the accelerator (NCCL cannot
        reduce CPU tensors, which is where offloaded masters live); the fp32 bits travel as int32 and
        are summed with zeros, so every value, -0.0 included, arrives unchanged."""
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().current_device_name()
        out: dict[str, torch.Tensor] = {}
        for name, p, (local, start) in zip(self.names, self.params, slices):
            numel = self.numel(p)
            if self.partitioned:
                full = torch.zeros(numel, dtype=torch.float32, device=device)
                place_slice(full, local, start)
                torch.distributed.all_reduce(full.view(torch.int32))
            else:
                full = local
            if to_all or self.rank == 0:
                out[name] = full.view(self.shape(p)).detach().cpu().clone()
        return out


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
