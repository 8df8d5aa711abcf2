"""Process-group start-up and the few collectives the loop needs, through DeepSpeed's accelerator
abstraction (CPU/gloo here, CUDA/NCCL on GPUs) so no device is hard-coded.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Join the process group started by a launcher (deepspeed, srun), or form a group of one
    when started as plain `python -m ds_diffusers.train`."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), timeout=timedelta(seconds=timeout_s))
    rank = torch.distributed.get_rank()
    world_size = torch.distributed.get_world_size()
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def mean_over_ranks(value: torch.Tensor) -> float:
    """All ranks must call this. A NaN on any rank makes the mean NaN, so every rank sees it."""
    reduced = value.detach().float().reshape(1).clone()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(reduced)
        reduced /= torch.distributed.get_world_size()
    return float(reduced.item())


def barrier() -> None:
    """All ranks must call this."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
