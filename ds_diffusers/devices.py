"""Which device this process trains on, through DeepSpeed's accelerator abstraction, and the refusal
to fall back to the CPU when GPUs were expected.

Two facts shape it:
- A node-local rank is not a device index. Sites that give each Slurm task its own GPU
  (`--gpus-per-task=1`, `--gpu-bind`, cgroup device isolation) show every task only device 0, while
  `SLURM_LOCALID` (our LOCAL_RANK) runs 0..N-1. The device is `local_rank % visible devices`,
  which also binds `--gpu-bind=closest` (each task sees its socket's GPUs) under the default block
  placement of tasks. Whether two ranks ended up on one GPU is checked where it can be: every rank
  claims its GPU's UUID in the rendezvous store before NCCL starts (`refuse_shared_devices`).
- DeepSpeed silently picks its CPU accelerator when torch sees no GPU (a CPU build of torch, a
  driver problem, a job that forgot `--gres`): a GPU job would then "train" on the CPU for days.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Mapping

import torch

from ds_diffusers.errors import ConfigError

# 1: run on the CPU although GPUs were expected (a Slurm job, CUDA_VISIBLE_DEVICES set).
ALLOW_CPU_ENV = "DSD_ALLOW_CPU"
# Where Slurm says a job or step was given GPUs: SLURM_GPUS* (--gpus, --gpus-per-node/task, and
# SLURM_GPUS_ON_NODE from slurmd), SLURM_JOB_GPUS / SLURM_STEP_GPUS (the GPU ids of a --gres job);
# the TRES/GRES variables hold any resource, so only a value naming a gpu counts.
_SLURM_GPU_IDS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
_SLURM_TRES = ("SLURM_TRES_PER_TASK", "SLURM_TRES_PER_NODE", "SLURM_JOB_GRES", "SLURM_GRES", "SBATCH_GRES")


def device_index(local_rank: int, device_count: int) -> int:
    """The visible device a node-local rank drives: its own index when it sees all the node's GPUs,
    device 0 when it sees only its own."""
    if device_count < 1:
        raise ValueError(f"device_count must be >= 1, got {device_count}")
    return local_rank % device_count


def bind_device(accelerator: Any, local_rank: int, local_size: int) -> torch.device:
    """Set and return this rank's device. Must run before `deepspeed.init_distributed`: DeepSpeed
    reads LOCAL_RANK as a device index (the engine's set_device, the NCCL group's device_id, ZeRO-3's
    local device), so where the two differ LOCAL_RANK is rewritten to the index; the node-local rank
    itself stays in DistInfo.local_rank."""
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    count = accelerator.device_count()
    if count < 1:
        raise ConfigError("LOCAL_RANK", local_rank, f"the {accelerator.device_name()} accelerator has no visible device"
                          f"{visible_devices(accelerator)}; check the job's GPU request and the driver")
    index = device_index(local_rank, count)
    if index != local_rank:
        os.environ["LOCAL_RANK"] = str(index)
    accelerator.set_device(index)
    return torch.device(accelerator.device_name(index))


def device_identity(accelerator: Any, index: int) -> str | None:
    """What names this rank's device across the job: the GPU's UUID under CUDA (the same GPU reached
    through different visible-device lists has one), host and visible id elsewhere; None on the CPU."""
    name = accelerator.device_name()
    if name == "cpu":
        return None
    if name == "cuda":
        return f"GPU-{torch.cuda.get_device_properties(index).uuid}"
    visible = os.environ.get(accelerator.visible_devices_envs()[0], "")
    ids = [part for part in visible.split(",") if part]
    return f"{socket.gethostname()} {name}:{ids[index] if index < len(ids) else index}"


def refuse_shared_devices(store: Any, rank: int, world_size: int, identity: str) -> None:
    """All ranks, in the rendezvous store before the communication backend starts (NCCL would stop
    with "Duplicate GPU detected", or two ranks would share a GPU's memory). Each rank counts itself
    on its device's key; once all have, a rank whose device was claimed twice raises. O(1) store
    operations per rank."""
    prefix = f"dsd-device/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store.add(f"{prefix}/{identity}", 1)
    if store.add(f"{prefix}/claimed", 1) == world_size:
        store.set(f"{prefix}/complete", "1")
    store.wait([f"{prefix}/complete"])
    claims = int(store.get(f"{prefix}/{identity}"))
    if claims > 1:
        raise ConfigError("LOCAL_RANK", os.environ.get("LOCAL_RANK", "?"), (
            f"rank {rank} shares {identity} on {socket.gethostname()} with {claims - 1} other rank(s): start one process "
            "per GPU (Slurm: --ntasks-per-node equal to the N of --gres=gpu:N; locally: NUM_PROCS at most the GPU "
            "count); with --gpu-bind=closest, keep the default block placement of tasks on sockets"))


def visible_devices(accelerator: Any) -> str:
    """`, CUDA_VISIBLE_DEVICES=2,3` (the accelerator's own variable) when set, for start-up lines."""
    if accelerator.device_name() == "cpu":
        return ""
    name = accelerator.visible_devices_envs()[0]
    return f", {name}={os.environ[name]}" if name in os.environ else ""


_DEEPSPEED_LAUNCHER_ENV = {"CROSS_RANK", "LOCAL_SIZE"}


def gpu_request(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The first environment variable saying this process was meant to have GPUs, as (name, value)."""
    for name in sorted(environ):
        value = environ[name]
        if name in _SLURM_GPU_IDS and value:  # GPU ids: "0" is the first GPU
            return name, value
        if name.startswith("SLURM_GPUS") and value not in ("", "0"):  # counts
            return name, value
        if name in _SLURM_TRES and "gpu" in value.lower():
            return name, value
    visible = environ.get("CUDA_VISIBLE_DEVICES", "")
    # The deepspeed launcher (deepspeed/launcher/launch.py, which alone sets CROSS_RANK and
    # LOCAL_SIZE) writes its own CUDA_VISIBLE_DEVICES for every rank, even with the CPU accelerator,
    # so there the variable says nothing about what the user asked for.
    if _DEEPSPEED_LAUNCHER_ENV <= environ.keys():
        return None
    # An empty list or -1 is how GPUs are hidden on purpose; Slurm's "NoDevFiles" means it meant to give some.
    if visible and not visible.startswith("-"):
        return "CUDA_VISIBLE_DEVICES", visible
    return None


def _why_no_gpu(environ: Mapping[str, str]) -> str:
    if environ.get("DS_ACCELERATOR", "") == "cpu":
        return "DS_ACCELERATOR=cpu forces DeepSpeed's CPU accelerator"
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"torch {torch.__version__} is a CPU-only build; install the CUDA build of torch"
    return "torch sees no GPU (torch.cuda.is_available() is False); check the driver with nvidia-smi"


def check_accelerator_expected(accelerator_name: str | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Refuse DeepSpeed's CPU accelerator under Slurm or when GPUs were requested, unless
    DSD_ALLOW_CPU=1. Call it before anything is written: the entrypoints do, in their checks."""
    environ = os.environ if environ is None else environ
    allow = environ.get(ALLOW_CPU_ENV, "")
    if allow not in ("", "0", "1"):
        raise ConfigError(ALLOW_CPU_ENV, allow, "use 1 to allow running on the CPU, 0 or unset to refuse")
    if allow == "1":
        return
    if accelerator_name is None:
        from deepspeed.accelerator import get_accelerator

        accelerator_name = get_accelerator().device_name()
    if accelerator_name != "cpu":
        return
    request = gpu_request(environ)
    on_purpose = f"export {ALLOW_CPU_ENV}=1 to run on the CPU on purpose"
    if request is not None:
        name, value = request
        raise ConfigError(name, value, f"GPUs were requested but DeepSpeed found none and would run on the CPU: "
                          f"{_why_no_gpu(environ)}; or {on_purpose}")
    if environ.get("SLURM_JOB_ID"):
        raise ConfigError("SLURM_JOB_ID", environ["SLURM_JOB_ID"], "this Slurm job has no GPU and would run on the CPU: "
                          "request GPUs with --gres=gpu:N and --ntasks-per-node=N (see scripts/train_text_to_image.slurm), "
                          f"or {on_purpose}")
