"""The shell helpers behind scripts/*.sh and scripts/*.slurm, run by bash without a cluster: the
launcher command for CUDA_VISIBLE_DEVICES, the crash-requeue decision, the GPUs-vs-tasks check and
the rendezvous port. (The scripts themselves run on a real Slurm cluster in tests/slurm/.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
[[ "$1" == -L ]] || exit 9
for i in $(seq 0 $(( ${FAKE_GPUS:-8} - 1 ))); do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done
"""
NO_DRIVER = "#!/usr/bin/env bash\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n"


def bash(script: str, env: dict[str, str] | None = None, path_prefix: Path | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "CUDA_VISIBLE", "NUM_PROCS", "MASTER_PORT", "DSD_"))}
    if path_prefix is not None:
        base["PATH"] = f"{path_prefix}:{base['PATH']}"
    return subprocess.run(["bash", "-c", script], cwd=REPO, env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def gpu_machine(tmp_path) -> Path:
    """A PATH folder whose nvidia-smi lists FAKE_GPUS (default 8) GPUs."""
    (tmp_path / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (tmp_path / "nvidia-smi").chmod(0o755)
    return tmp_path


def dry_run(env: dict[str, str], path_prefix: Path) -> subprocess.CompletedProcess:
    return bash("bash scripts/train_text_to_image.sh cfg/sd15_lora.json --set seed=1",
                {"DSD_DRY_RUN": "1", "MASTER_PORT": "29999", **env}, path_prefix)


TAIL = "--master_port 29999 --module ds_diffusers.train --cfg cfg/sd15_lora.json --set seed=1"


@pytest.mark.parametrize("env, command", [
    # The launcher drops CUDA_VISIBLE_DEVICES next to --num_gpus: the ids must become --include.
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, f"deepspeed --include localhost:2,3 {TAIL}"),
    ({"CUDA_VISIBLE_DEVICES": "2,3,6,7", "NUM_PROCS": "3"}, f"deepspeed --include localhost:2,3,6 {TAIL}"),
    ({}, f"deepspeed --num_gpus 8 {TAIL}"),
    ({"NUM_PROCS": "2"}, f"deepspeed --num_gpus 2 {TAIL}"),
    # One process needs no launcher; it inherits CUDA_VISIBLE_DEVICES as it is.
    ({"CUDA_VISIBLE_DEVICES": "5"}, "python -m ds_diffusers.train --cfg cfg/sd15_lora.json --set seed=1"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5d3c"}, "python -m ds_diffusers.train --cfg cfg/sd15_lora.json --set seed=1"),
])
def test_launch_command_on_gpus(gpu_machine, env, command):
    result = dry_run(env, gpu_machine)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == command


@pytest.mark.parametrize("env, message", [
    ({"CUDA_VISIBLE_DEVICES": "2,3", "NUM_PROCS": "3"}, "NUM_PROCS=3 but only 2 GPU(s) to use (2,3)"),
    ({"NUM_PROCS": "9"}, "NUM_PROCS=9 but only 8 GPU(s)"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5d3c,GPU-77ab"}, "CUDA_VISIBLE_DEVICES=GPU-5d3c,GPU-77ab: the deepspeed launcher takes GPU indices"),
])
def test_launch_refuses(gpu_machine, env, message):
    result = dry_run(env, gpu_machine)
    assert result.returncode == 2 and not result.stdout, result.stdout
    assert message in result.stderr


@pytest.mark.parametrize("env, command", [
    ({}, "python -m ds_diffusers.train --cfg cfg/sd15_lora.json --set seed=1"),
    ({"NUM_PROCS": "2"}, f"deepspeed --num_gpus 2 {TAIL}"),
    # No GPU: the variable is left for ds_diffusers to refuse (GPUs expected) unless DSD_ALLOW_CPU=1.
    ({"NUM_PROCS": "2", "CUDA_VISIBLE_DEVICES": "2,3"}, f"deepspeed --num_gpus 2 {TAIL}"),
])
def test_launch_command_without_gpus(tmp_path, env, command):
    (tmp_path / "nvidia-smi").write_text(NO_DRIVER)
    (tmp_path / "nvidia-smi").chmod(0o755)
    result = dry_run(env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == command


@pytest.mark.parametrize("command_line, command", [
    ("train_text_to_image.sh", "python -m ds_diffusers.train --cfg cfg/default.json"),
    ("train_text_to_image.sh --set seed=1", "python -m ds_diffusers.train --cfg cfg/default.json --set seed=1"),
    ("test_text_to_image.sh cfg/sd15_lora.json --set sample.seed=2",
     "python -m ds_diffusers.sample --cfg cfg/sd15_lora.json --set sample.seed=2"),
    ("prepare_cache.sh cfg/sd15_full.json", "python -m ds_diffusers.cache --cfg cfg/sd15_full.json"),
])
def test_cfg_is_the_first_argument_unless_it_is_an_option(tmp_path, command_line, command):
    (tmp_path / "nvidia-smi").write_text(NO_DRIVER)
    (tmp_path / "nvidia-smi").chmod(0o755)
    result = bash(f"bash scripts/{command_line}", {"DSD_DRY_RUN": "1"}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == command


def _repo_bootstrap(script: str) -> str:
    text = (REPO / "scripts" / script).read_text()
    return text[text.index("# sbatch runs a copy"):text.index('repo="$(dsd_find_repo)"')]


def test_slurm_scripts_find_the_repository_the_same_way():
    """sbatch runs a spooled copy of a .slurm file, so the function that finds the repository (and
    with it scripts/lib/) cannot itself live in scripts/lib/: each file carries it, and they must not drift."""
    assert "dsd_find_repo() {" in _repo_bootstrap("train_text_to_image.slurm")
    assert _repo_bootstrap("train_text_to_image.slurm") == _repo_bootstrap("test_text_to_image.slurm")
    assert _repo_bootstrap("train_text_to_image.slurm") == _repo_bootstrap("prepare_cache.slurm")


def requeue(rc: int, usr1: int = 0, term: int = 0, restarts: int = 0, max_restarts: int = 3) -> tuple[bool, str]:
    result = bash(f". scripts/lib/slurm.sh; dsd_requeue_reason {rc} {usr1} {term} {restarts} {max_restarts}")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0, result.stdout.strip()


def test_exit_codes_match_the_python_side():
    from ds_diffusers import preemption
    result = bash(". scripts/lib/slurm.sh; echo $DSD_EXIT_PREEMPTED $DSD_EXIT_INTERRUPTED")
    assert result.stdout.split() == [str(preemption.EXIT_PREEMPTED), str(preemption.EXIT_INTERRUPTED)]


def test_requeue_decision():
    assert requeue(0) == (False, "tasks finished")
    assert requeue(75, restarts=9)[0], "preemption requeues whatever the restart count"
    assert requeue(1, usr1=1)[0], "a failure after USR1 was forwarded is a preemption"
    assert requeue(137) == (True, "tasks failed with exit code 137 (a crash); restart 1 of DSD_MAX_RESTARTS=3")
    assert requeue(1, restarts=2)[0]
    requeued, reason = requeue(1, restarts=3)
    assert not requeued and "already been restarted 3 time(s) (DSD_MAX_RESTARTS=3)" in reason
    assert not requeue(1, max_restarts=0)[0]
    assert requeue(2) == (False, "tasks stopped with exit code 2 (a config error); not requeued")
    assert requeue(3) == (False, "tasks stopped with exit code 3 (training stopped); not requeued")
    assert requeue(130) == (False, "tasks stopped with exit code 130 (interrupted by SIGINT); not requeued")
    assert not requeue(75, term=1)[0] and not requeue(1, term=1)[0]


@pytest.mark.parametrize("lines, rc, expected", [
    # A rank stopped in order, srun then killed its peers: srun says 143, the reason is 2.
    (["srun: error: n1: task 1: Exited with exit code 2", "srun: error: n1: task 0: Terminated"], 143, 2),
    (["srun: error: n1: tasks 0-3: Exited with exit code 3"], 3, 3),
    (["srun: error: n2: task 5: Exited with exit code 75", "srun: error: n1: task 0: Killed"], 137, 75),
    (["srun: error: n1: task 1: Exited with exit code 1", "srun: error: n1: task 0: Terminated"], 143, 143),
    (["srun: error: n1: task 0: Exited with exit code 12"], 12, 12),
    (["srun: error: n1: task 2: Exited with exit code 130", "srun: error: n1: task 0: Terminated"], 143, 130),
    ([], 0, 0),
])
def test_step_exit_code(tmp_path, lines, rc, expected):
    exits = tmp_path / "exits"
    exits.write_text("".join(f"{line}\n" for line in lines))
    result = bash(f". scripts/lib/slurm.sh; dsd_step_exit_code {rc} {exits}")
    assert result.stdout.strip() == str(expected), result.stderr


def test_bad_max_restarts_stops_before_srun():
    result = bash(". scripts/lib/slurm.sh; dsd_srun() { echo STARTED; }; dsd_srun_preemptible true",
                  {"DSD_MAX_RESTARTS": "three"})
    assert result.returncode == 2 and "STARTED" not in result.stdout
    assert "DSD_MAX_RESTARTS=three: must be a whole number" in result.stderr


@pytest.mark.parametrize("env, ok", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_TASKS_PER_NODE": "1", "SLURM_NTASKS_PER_NODE": "1"}, False),
    ({"SLURM_JOB_GPUS": "0,1", "SLURM_TASKS_PER_NODE": "4(x2)"}, False),
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)"}, True),
    ({"SLURM_JOB_GPUS": "0,1", "SLURM_TASKS_PER_NODE": "2,1"}, True),   # the first node is checked
    ({"SLURM_TASKS_PER_NODE": "2"}, True),                               # no GPUs: a CPU job, no check
])
def test_gpus_per_node_match_tasks(env, ok):
    result = bash(". scripts/lib/slurm.sh; dsd_check_gpus_per_node; echo CHECKED", env)
    if ok:
        assert result.returncode == 0 and "CHECKED" in result.stdout, result.stderr
    else:
        assert result.returncode == 2 and "CHECKED" not in result.stdout
        line = result.stderr.strip()
        assert "\n" not in line and "one task drives one GPU" in line
        gpus = env.get("SLURM_GPUS_ON_NODE", "2")
        assert f"has {gpus} GPU(s)" in line and f"sbatch --gres=gpu:{gpus} --ntasks-per-node={gpus}" in line


def test_tasks_on_node():
    result = bash(". scripts/lib/slurm.sh; for n in 0 1 2 3; do dsd_tasks_on_node $n; done",
                  {"SLURM_TASKS_PER_NODE": "2(x3),1"})
    assert result.stdout.split() == ["2", "2", "2", "1"]


def test_tasks_in_job_come_from_this_runs_allocation():
    # A requeued job's SLURM_NTASKS can be its first run's (2 nodes) on a 1-node run.
    result = bash(". scripts/lib/slurm.sh; dsd_tasks_in_job", {"SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NTASKS": "2"})
    assert result.stdout.split() == ["7"]
    result = bash(". scripts/lib/slurm.sh; dsd_tasks_in_job", {"SLURM_TASKS_PER_NODE": "1", "SLURM_NTASKS": "2"})
    assert result.stdout.split() == ["1"]


@pytest.mark.parametrize("job_id", [1, 11999, 12000, 4_294_967_295])
def test_master_port_below_ephemeral_range(job_id):
    port = int(bash(f". scripts/lib/slurm.sh; dsd_master_port {job_id}").stdout)
    assert 20000 <= port < 32768  # Linux's ephemeral ports start at 32768
