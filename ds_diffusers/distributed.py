"""Process-group start-up and the few collectives the loop needs, through DeepSpeed's accelerator
abstraction (CPU/gloo here, CUDA/NCCL on GPUs) so no device is hard-coded.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
from torch.distributed.rendezvous import register_rendezvous_handler

from ds_diffusers.devices import bind_device, check_accelerator_expected, device_identity, refuse_shared_devices, visible_devices
from ds_diffusers.errors import ConfigError

# Seconds a rank waits to reach rank 0's rendezvous store (and rank 0 for all ranks to arrive)
# before failing with a message naming MASTER_ADDR:MASTER_PORT, instead of the collective timeout.
RENDEZVOUS_TIMEOUT_ENV = "DSD_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 300
_RENDEZVOUS_SCHEME = "dsd-env"
# This rank's device (`devices.device_identity`), claimed in the rendezvous store; None on the CPU.
_device_claim: str | None = None
# How long ranks wait for others that prepare something first (`in_turn`): loading a large dataset the
# first time converts it to Arrow, which can take hours, far past the collectives' timeout.
TURN_TIMEOUT = timedelta(hours=6)
_turn_group = None  # a gloo group with TURN_TIMEOUT, made on first use
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now, for a rendezvous that must not collide with another run's."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rendezvous_timeout_s() -> float:
    raw = os.environ.get(RENDEZVOUS_TIMEOUT_ENV, str(DEFAULT_RENDEZVOUS_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(RENDEZVOUS_TIMEOUT_ENV, raw, "must be a positive number of seconds, e.g. 300")
    return value


def _bounded_env_rendezvous(url: str, timeout: timedelta, **kwargs):
    """torch's env:// rendezvous with its own connect timeout. Under env:// the TCPStore connect
    (and rank 0's wait for the other ranks) uses the collective timeout (30 min), so one rank that
    cannot reach MASTER_ADDR:MASTER_PORT keeps the whole job waiting that long."""
    from torch.distributed import DistError, TCPStore

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    rendezvous_s = _rendezvous_timeout_s()
    # Under torchrun's agent store, rank 0 is a client too.
    is_master = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        store = TCPStore(addr, port, world_size, is_master=is_master, timeout=timedelta(seconds=rendezvous_s),
                         wait_for_workers=True, multi_tenant=True)
    except DistError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        waited = "for all ranks to join" if is_master else "to reach rank 0"
        raise ConfigError("MASTER_ADDR:MASTER_PORT", f"{addr}:{port}", (
            f"rank {rank} of {world_size} waited {rendezvous_s:.0f} s {waited} and gave up ({reason}). Check that "
            f"every rank started, that {addr} resolves and port {port} is free on it and open between the nodes; "
            f"raise {RENDEZVOUS_TIMEOUT_ENV} when ranks start slowly")) from None
    if _device_claim is not None:
        refuse_shared_devices(store, rank, world_size, _device_claim)
    store.set_timeout(timeout)
    yield store, rank, world_size


def _register_rendezvous() -> None:
    try:
        register_rendezvous_handler(_RENDEZVOUS_SCHEME, _bounded_env_rendezvous)
    except RuntimeError:  # already registered by an earlier call in this process
        pass


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Join the process group started by a launcher (deepspeed, srun), or form a group of one
    when started as plain `python -m ds_diffusers.train`."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    accelerator = get_accelerator()
    check_accelerator_expected(accelerator.device_name())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    device = bind_device(accelerator, local_rank, local_size)
    global _device_claim
    _device_claim = device_identity(accelerator, device.index) if device.index is not None else None
    _register_rendezvous()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), timeout=timedelta(seconds=timeout_s),
                               init_method=f"{_RENDEZVOUS_SCHEME}://")
    rank = torch.distributed.get_rank()
    world_size = torch.distributed.get_world_size()
    if accelerator.device_name() == "cpu":
        _unlink_shm_comm_segments(local_rank)
    # One greppable line per rank: launcher logs (log/*.out under Slurm) show who joined, on which device.
    print(f"ds-diffusers: rank {rank}/{world_size} on {socket.gethostname()} device {device} "
          f"(local rank {local_rank}/{local_size}{visible_devices(accelerator)})", flush=True)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def _unlink_shm_comm_segments(local_rank: int) -> None:
    """All ranks must call this. DeepSpeed's CPU all-reduce maps one 66 MB /dev/shm segment per rank,
    named after MASTER_ADDR/MASTER_PORT, and never unlinks it: every run, finished or killed, would
    leave them behind until /dev/shm (RAM) is full. Once every rank has mapped every segment (the
    barrier), the names can go; the mappings live on until the processes exit."""
    barrier()
    if local_rank != 0:
        return
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_"
    for segment in Path("/dev/shm").glob(f"{prefix}*"):
        segment.unlink(missing_ok=True)


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """All ranks must call this. The element-wise sum of `values` over all ranks, as a tensor on its
    own device: no host read here, so a caller can batch several quantities into one collective
    and read them back (one device-to-host copy) when it needs them."""
    reduced = values.detach().clone()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(reduced)
    return reduced


def barrier() -> None:
    """All ranks must call this."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """All ranks must call this: True only when `ok` holds on every rank."""
    failed = sum_over_ranks(torch.tensor([0.0 if ok else 1.0], device=device))
    return float(failed.item()) == 0.0


def broadcast_from_main(value: object) -> object:
    """All ranks must call this: rank 0's `value` (any picklable object), on every rank."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather(value: object) -> list[object]:
    """All ranks must call this: every rank's `value` (any picklable object) in rank order, on every
    rank. Through the gloo group that waits TURN_TIMEOUT: ranks may reach it minutes apart (hashing
    their checkpoint files)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [value]
    values: list[object] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value, group=_waiting_group())
    return values


class StoppedOnEveryRank(ConfigError):
    """A ConfigError that every rank raised at the same point (`raise_on_every_rank`): the ranks
    leave together, so the entrypoint may tear the process group down."""


def _waiting_group():
    """A gloo group whose collectives wait TURN_TIMEOUT (CPU-side, whatever the device backend)."""
    global _turn_group
    if _turn_group is None:
        _turn_group = torch.distributed.new_group(backend="gloo", timeout=TURN_TIMEOUT)
    return _turn_group


def raise_on_every_rank(error: ConfigError | None) -> None:
    """All ranks must call this. When any rank holds a ConfigError, every rank raises the lowest
    rank's (as StoppedOnEveryRank): bad input found by one rank stops the job with one message and
    exit code on every rank, and no rank waits in a collective for a peer that already stopped."""
    errors = all_gather(error)
    first = next((found for found in errors if found is not None), None)
    if first is not None:
        raise StoppedOnEveryRank(first.field, first.value, first.fix)


def in_turn(work: Callable[[], T], mine: bool) -> T | None:
    """All ranks must call this. The ranks for which `mine` holds run `work` (None elsewhere) while the
    others wait, up to TURN_TIMEOUT; a ConfigError it raises on any rank is raised on every rank."""
    result, error = None, None
    if mine:
        try:
            result = work()
        except ConfigError as err:
            error = err
    raise_on_every_rank(error)
    return result


def shutdown_distributed() -> None:
    """All ranks must call this, last. Tearing the process group down explicitly, after every rank
    is done, rather than in the interpreter's exit: there, the store and gloo threads of a rank
    whose peer already exited can abort it ("terminate called without an active exception")."""
    global _turn_group
    if torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()  # every group, the waiting group too
    _turn_group = None
