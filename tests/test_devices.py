"""Device binding (local rank -> visible device) and the refusal to fall back to the CPU when GPUs
were expected. The accelerator is a stand-in: the binding logic must hold for GPUs this machine lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from ds_diffusers.devices import (ALLOW_CPU_ENV, bind_device, check_accelerator_expected, device_index, gpu_request,
                                  refuse_shared_devices)
from ds_diffusers.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


class FakeAccelerator:
    """The part of DeepSpeed's accelerator interface that device binding uses."""

    def __init__(self, name: str = "cuda", count: int = 1) -> None:
        self.name, self.count, self.bound_to = name, count, None

    def device_name(self, index: int | None = None) -> str:
        return self.name if index is None or self.name == "cpu" else f"{self.name}:{index}"

    def device_count(self) -> int:
        return self.count

    def set_device(self, index: int) -> None:
        self.bound_to = index

    def visible_devices_envs(self) -> list[str]:
        return ["CUDA_VISIBLE_DEVICES"]

    def communication_backend_name(self) -> str:
        return "nccl"


@pytest.mark.parametrize("local_rank, count, expected", [(3, 1, 0), (0, 1, 0), (3, 4, 3), (5, 4, 1), (7, 8, 7)])
def test_device_index(local_rank, count, expected):
    assert device_index(local_rank, count) == expected


@pytest.mark.parametrize("local_rank, local_size, count, expected", [
    (3, 4, 1, 0),   # --gpus-per-task=1 / --gpu-bind: each task sees only its own GPU, as device 0
    (2, 4, 4, 2),   # --gres=gpu:4 --ntasks-per-node=4: every task sees all four
    (1, 2, 8, 1),   # fewer ranks than visible GPUs: the first ones are used
])
def test_bind_device(monkeypatch, local_rank, local_size, count, expected):
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    accelerator = FakeAccelerator(count=count)
    device = bind_device(accelerator, local_rank, local_size)
    assert device == torch.device(f"cuda:{expected}") and accelerator.bound_to == expected
    # DeepSpeed's engine, NCCL device_id and ZeRO-3 read LOCAL_RANK as the device index.
    assert os.environ["LOCAL_RANK"] == str(expected)


def test_bind_device_accepts_gpu_bind_closest(monkeypatch):
    """--gpu-bind=closest: 8 tasks, each sees its socket's 4 GPUs; task 5 (socket 1) drives its second."""
    monkeypatch.setenv("LOCAL_RANK", "5")
    accelerator = FakeAccelerator(count=4)
    assert bind_device(accelerator, 5, 8) == torch.device("cuda:1") and accelerator.bound_to == 1


def _claim_all(identities: list[str]) -> dict[int, str]:
    """Every rank's `refuse_shared_devices` against one real TCPStore, each rank in its own thread
    with its own client, as the ranks of a job are; rank -> the error it raised."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    world = len(identities)
    server = TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    errors: dict[int, str] = {}

    def rank_main(rank: int) -> None:
        client = TCPStore("127.0.0.1", server.port, world, is_master=False, timeout=timedelta(seconds=30))
        try:
            refuse_shared_devices(client, rank, world, identities[rank])
        except ConfigError as err:
            errors[rank] = str(err)

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_two_ranks_on_one_gpu_are_refused_before_the_backend_starts():
    """A cyclic task placement under --gpu-bind=closest puts ranks 0 and 2 on one GPU: both stop
    with a message naming the GPU; the others pass the check and end with them."""
    errors = _claim_all(["GPU-a", "GPU-b", "GPU-a", "GPU-c"])
    assert sorted(errors) == [0, 2]
    assert "GPU-a" in errors[0] and "1 other rank(s)" in errors[0] and "--gpu-bind=closest" in errors[0]
    assert _claim_all(["GPU-a", "GPU-b", "GPU-c"]) == {}


def test_bind_device_cpu_binds_nothing(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    accelerator = FakeAccelerator(name="cpu", count=1)
    assert bind_device(accelerator, 1, 2) == torch.device("cpu")
    assert accelerator.bound_to is None and os.environ["LOCAL_RANK"] == "1"


def test_init_distributed_binds_and_reports_the_device(monkeypatch, capsys):
    """init_distributed's wiring, with the process-group start stubbed out: task 3 of a node whose
    tasks each see one GPU trains on device 0 and says so."""
    import deepspeed
    import deepspeed.accelerator

    from ds_diffusers import distributed
    from ds_diffusers.distributed import init_distributed

    monkeypatch.setattr(distributed, "_device_claim", None)
    accelerator = FakeAccelerator(count=1)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accelerator)
    seen = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: seen.update(local_rank=os.environ["LOCAL_RANK"]))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 7)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(uuid=f"uuid-of-{index}"))
    for name, value in {"RANK": "7", "LOCAL_RANK": "3", "WORLD_SIZE": "8", "LOCAL_SIZE": "4",
                        "CUDA_VISIBLE_DEVICES": "3"}.items():
        monkeypatch.setenv(name, value)
    dist = init_distributed()
    assert dist.device == torch.device("cuda:0") and dist.local_rank == 3 and accelerator.bound_to == 0
    assert seen["local_rank"] == "0"  # rewritten before DeepSpeed starts the group
    # What the rendezvous claims for this rank, before the backend starts (refuse_shared_devices).
    assert distributed._device_claim == "GPU-uuid-of-0"
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("ds-diffusers: rank 7/8 on "), line
    assert line.endswith(" device cuda:0 (local rank 3/4, CUDA_VISIBLE_DEVICES=3)"), line


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "12"}, None),
    ({"SLURM_JOB_GPUS": "0,1"}, ("SLURM_JOB_GPUS", "0,1")),
    ({"SLURM_GPUS_PER_TASK": "1"}, ("SLURM_GPUS_PER_TASK", "1")),
    ({"SLURM_TRES_PER_TASK": "cpu=8"}, None),  # Slurm 22.05+ sets it for --cpus-per-task alone
    ({"SLURM_TRES_PER_TASK": "cpu=8,gres/gpu:1"}, ("SLURM_TRES_PER_TASK", "cpu=8,gres/gpu:1")),
    ({"CUDA_VISIBLE_DEVICES": ""}, None),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, ("CUDA_VISIBLE_DEVICES", "2,3")),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, ("CUDA_VISIBLE_DEVICES", "NoDevFiles")),
])
def test_gpu_request(environ, expected):
    assert gpu_request(environ) == expected


@pytest.mark.parametrize("environ, field", [
    ({"SLURM_JOB_ID": "12", "SLURM_JOB_GPUS": "0"}, "SLURM_JOB_GPUS"),
    ({"SLURM_JOB_ID": "12"}, "SLURM_JOB_ID"),
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, "CUDA_VISIBLE_DEVICES"),
    ({"SLURM_JOB_ID": "12", ALLOW_CPU_ENV: "yes"}, ALLOW_CPU_ENV),
])
def test_cpu_refused_when_gpus_expected(environ, field):
    with pytest.raises(ConfigError) as caught:
        check_accelerator_expected("cpu", environ)
    assert caught.value.field == field
    assert "\n" not in str(caught.value)
    if field != ALLOW_CPU_ENV:
        assert f"{ALLOW_CPU_ENV}=1" in str(caught.value)


@pytest.mark.parametrize("name, environ", [
    ("cpu", {}),
    ("cpu", {"SLURM_JOB_ID": "12", "SLURM_JOB_GPUS": "0", ALLOW_CPU_ENV: "1"}),
    ("cpu", {"CUDA_VISIBLE_DEVICES": "-1"}),
    ("cuda", {"SLURM_JOB_ID": "12", "SLURM_JOB_GPUS": "0"}),
])
def test_cpu_allowed(name, environ):
    check_accelerator_expected(name, environ)


def test_train_refuses_cpu_under_slurm_before_writing(tiny_assets, tmp_path):
    """The entrypoint: exit 2, one line naming the variable, no output or checkpoint folder made."""
    cfg = json.loads((REPO / "cfg" / "default.json").read_text())
    cfg.update({"pretrained_model_name_or_path": str(tiny_assets.model_dir), "dataset_dir": str(tiny_assets.dataset_dir),
                "output_dir": str(tmp_path / "model"), "checkpoint_dir": str(tmp_path / "checkpoints")})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k != ALLOW_CPU_ENV}
    env.update({"SLURM_JOB_ID": "4242", "SLURM_JOB_GPUS": "0,1", "OMP_NUM_THREADS": "1"})
    result = subprocess.run([sys.executable, "-m", "ds_diffusers.train", "--cfg", str(tmp_path / "cfg.json")], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ds-diffusers: config error: SLURM_JOB_GPUS='0,1': GPUs were requested"), result.stderr[-3000:]
    assert not (tmp_path / "model").exists() and not (tmp_path / "checkpoints").exists()


def test_deepspeed_launchers_own_cuda_visible_devices_is_not_a_gpu_request():
    # deepspeed/launcher/launch.py sets CUDA_VISIBLE_DEVICES for every rank, also on the CPU
    # accelerator; a 2-process CPU run started through it must not be refused.
    launched = {"CUDA_VISIBLE_DEVICES": "0,1", "CROSS_RANK": "0", "LOCAL_SIZE": "2", "LOCAL_RANK": "1"}
    assert gpu_request(launched) is None
    check_accelerator_expected("cpu", launched)
    # Slurm's GPU variables still count under the launcher.
    assert gpu_request({**launched, "SLURM_JOB_GPUS": "0"}) == ("SLURM_JOB_GPUS", "0")
