"""The real `.slurm` scripts, submitted with `sbatch --wait` to a local two-node Slurm cluster
(cluster.py): ranks mapped over nodes, the export, sampling, and preemption -> requeue -> resume.

Jobs are submitted from a temporary folder, not the repository, so the scripts must find the
repository themselves (sbatch runs a spooled copy of them).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests import fault_injection
from tests.slurm.cluster import NODES, poll
from tests.slurm.conftest import REPO, Submitter, metrics_steps, wait_for_steps, write_tiny_cfg

pytestmark = pytest.mark.slurm
# Tests name `slurm_cluster` before `tiny_assets`: without a cluster they skip before building the assets.
TRAIN = REPO / "scripts" / "train_text_to_image.slurm"
SAMPLE = REPO / "scripts" / "test_text_to_image.slurm"
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1"]
ONE_NODE_TWO_TASKS = ["--nodes=1", "--ntasks-per-node=2"]


def assert_unet_trained(output_dir: Path, base_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    trained = UNet2DConditionModel.from_pretrained(output_dir, subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    changed = [not torch.equal(p, q) for p, q in zip(base.parameters(), trained.parameters())]
    assert sum(changed) > 0.9 * len(changed), "the export does not hold trained weights"


@pytest.fixture(scope="module")
def two_node_run(slurm_cluster, tiny_assets, tmp_path_factory):
    """One training job on two nodes, one task each; shared by the training and sampling tests."""
    run_dir = tmp_path_factory.mktemp("two_nodes")
    submitter = Submitter(slurm_cluster, run_dir)
    cfg = write_tiny_cfg(tiny_assets, run_dir, max_train_steps=6)
    job = submitter.run(TRAIN, "dsd-train-2n", TWO_NODES, [str(cfg)], timeout_s=300)
    return submitter, run_dir, cfg, job


def test_two_nodes_train_and_export(slurm_cluster, two_node_run, tiny_assets):
    _, run_dir, _, job = two_node_run
    assert job.returncode == 0, job.explain()
    assert job.ranks() == {(0, 2), (1, 2)}, job.explain()
    assert f"2 node(s) [{' '.join(NODES)}]" in job.log, job.explain()
    assert job.log.count("device cpu (local rank 0/1)") == 2, job.explain()
    assert metrics_steps(run_dir / "model") == list(range(1, 7))
    assert_unet_trained(run_dir / "model", tiny_assets.model_dir)


def test_sampling_two_nodes(two_node_run):
    if not (REPO / "ds_diffusers" / "sample.py").exists():
        pytest.skip("ds_diffusers/sample.py does not exist yet (the sampling entrypoint is another issue): "
                    "scripts/test_text_to_image.slurm is not exercised")
    submitter, run_dir, cfg, train_job = two_node_run
    assert train_job.returncode == 0, train_job.explain()
    samples = run_dir / "samples"
    job = submitter.run(SAMPLE, "dsd-sample-2n", TWO_NODES, [str(cfg), "--set", "sample.num_inference_steps=2",
                                                             f"sample.output_dir={samples}"], timeout_s=300)
    assert job.returncode == 0, job.explain()
    assert job.ranks() == {(0, 2), (1, 2)}, job.explain()
    assert (samples / "manifest.json").is_file(), job.explain()


def test_preemption_saves_requeues_and_resumes(slurm_cluster, tiny_assets, submitter, tmp_path):
    steps = 30
    cfg = write_tiny_cfg(tiny_assets, tmp_path, max_train_steps=steps)
    output_dir = tmp_path / "model"
    proc = submitter.start(TRAIN, "dsd-preempt", ONE_NODE_TWO_TASKS, [str(cfg)])
    wait_for_steps(output_dir, 3, proc, timeout_s=240)
    # What Slurm sends to the batch shell before the time limit (--signal=B:USR1@300).
    submitter.cluster.run("scancel", "--signal=USR1", "--batch", submitter.job_id("dsd-preempt"))
    job = submitter.finish(proc, "dsd-preempt", timeout_s=360)

    assert job.returncode == 0, job.explain()
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+)", job.log)
    assert stopped, job.explain()
    stop_step = int(stopped.group(1))
    assert 3 <= stop_step < steps, job.explain()
    assert "requeueing job" in job.log and "(restart 1)" in job.log, job.explain()
    assert re.search(rf"resumed from \S+/step_{stop_step} at step {stop_step}", job.log), job.explain()
    assert f"done: {steps} steps" in job.log, job.explain()
    assert job.ranks() == {(0, 2), (1, 2)}, job.explain()
    # The checkpoint was taken at the stop step: no step is repeated or skipped across the restart.
    assert metrics_steps(output_dir) == list(range(1, steps + 1))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{steps}"
    assert_unet_trained(output_dir, tiny_assets.model_dir)


def test_crash_requeues_and_resumes_from_latest(slurm_cluster, tiny_assets, submitter, tmp_path):
    """Rank 0 dies (SIGKILL) right after the checkpoint of step 3: srun ends the step, the batch shell
    requeues the job as a crash, and the second run resumes from `latest` and finishes."""
    steps = 6
    cfg = write_tiny_cfg(tiny_assets, tmp_path, max_train_steps=steps, save_interval=3)
    submitter.env.update(fault_injection.environment("kill_after_save:3"))
    job = submitter.run(TRAIN, "dsd-crash", ONE_NODE_TWO_TASKS, [str(cfg)], timeout_s=420)

    assert job.returncode == 0, job.explain()
    assert re.search(r"tasks failed with exit code \d+ \(a crash\); restart 1 of DSD_MAX_RESTARTS=3; requeueing job",
                     job.log), job.explain()
    assert "(restart 1)" in job.log and re.search(r"resumed from \S+/step_3 at step 3", job.log), job.explain()
    assert f"done: {steps} steps" in job.log, job.explain()
    assert metrics_steps(tmp_path / "model") == list(range(1, steps + 1))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{steps}"


def test_requeue_onto_fewer_nodes_resumes_on_fewer_processes(slurm_cluster, tiny_assets, submitter, tmp_path):
    """The job trains on 2 nodes and rank 0 dies after the checkpoint of step 3. The second node is
    drained meanwhile, so the requeued job waits for nodes until it is shrunk to 1 node (as its user
    or an admin would); the second run converts the 2-process checkpoint, keeps the global batch on
    1 process and finishes. (A node range cannot be used: Slurm fixes a `--nodes=1-2
    --ntasks-per-node=1` job's task count at 1 on submission and never gives it 2 nodes; docs/slurm.md.)"""
    steps, name = 6, "dsd-shrink"
    cfg = write_tiny_cfg(tiny_assets, tmp_path, max_train_steps=steps, save_interval=3)
    submitter.env.update(fault_injection.environment("kill_after_save:3"))
    proc = submitter.start(TRAIN, name, TWO_NODES, [str(cfg)])
    job_id = submitter.job_id(name)
    poll("the first run started", lambda: slurm_cluster.job_state(job_id).startswith("RUNNING"), timeout_s=60)

    def requeued() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"sbatch returned ({proc.returncode}) before a requeue:\n{submitter.job_log(name)[-3000:]}")
        return slurm_cluster.job_state(job_id) == "PENDING restarts=1"

    with slurm_cluster.drained(NODES[1]):
        try:
            poll("the job requeued after the crash", requeued, timeout_s=240,
                 on_timeout=lambda: submitter.job_log(name)[-3000:])
            slurm_cluster.run("scontrol", "update", f"jobid={job_id}", "NumNodes=1", "NumTasks=1")
            job = submitter.finish(proc, name, timeout_s=300)
        finally:
            if proc.poll() is None:  # a poll failed: the job must not start on the node given back
                slurm_cluster.run("scancel", job_id, check=False)
                proc.wait(60)

    assert job.returncode == 0, job.explain()
    assert f"(restart 0): 2 node(s) [{' '.join(NODES)}], 2 task(s)" in job.log, job.explain()
    assert re.search(r"tasks failed with exit code \d+ \(a crash\); restart 1 of DSD_MAX_RESTARTS=3; requeueing job",
                     job.log), job.explain()
    assert f"(restart 1): 1 node(s) [{NODES[0]}], 1 task(s)" in job.log, job.explain()
    assert job.ranks() == {(0, 2), (1, 2), (0, 1)}, job.explain()
    assert re.search(r"0: resumed from \S+/step_3 at step 3 in \S+ s \(converted: 2 processes, ZeRO-2 -> 1 process, "
                     r"ZeRO-2\)", job.log), job.explain()
    assert "global batch 16 kept on 1 process(es): gradient_accumulation_steps 1 -> 2" in job.log, job.explain()
    assert f"done: {steps} steps" in job.log, job.explain()
    assert metrics_steps(tmp_path / "model") == list(range(1, steps + 1))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{steps}"
    assert not (tmp_path / "checkpoints" / ".universal").exists()
    assert_unet_trained(tmp_path / "model", tiny_assets.model_dir)


TASK_SCRIPT = """
if [[ "${SLURM_RESTART_COUNT:-0}" != 0 ]]; then
  echo "task $RANK/$WORLD_SIZE local $LOCAL_RANK/$LOCAL_SIZE on $SLURMD_NODENAME master $MASTER_ADDR:$MASTER_PORT resumed, setup=${SITE_SETUP:-missing}"
  exit 0
fi
# Like the trainer: every rank takes the signal, they "save" together, then all exit 75.
trap 'echo "task $RANK/$WORLD_SIZE on $SLURMD_NODENAME got USR1"; sleep 2; exit 75' USR1
echo "task $RANK/$WORLD_SIZE on $SLURMD_NODENAME ready"
for _ in $(seq 600); do sleep 0.1; done
echo "task $RANK/$WORLD_SIZE: no USR1 within 60 s"
exit 1
"""

BATCH_SCRIPT = """#!/usr/bin/env bash
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
. "$DSD_REPO/scripts/lib/slurm.sh"
dsd_trap_preemption
dsd_enter_repo "$DSD_REPO"
dsd_rendezvous
dsd_srun_preemptible bash "$1"
"""


def test_usr1_reaches_every_task_on_every_node(submitter, tmp_path):
    """scripts/lib/slurm.sh with a shell task in place of Python: every task on every node gets the
    forwarded USR1, the job requeues itself, and the site set-up file runs in each run."""
    (tmp_path / "task.sh").write_text(TASK_SCRIPT)
    (tmp_path / "batch.sh").write_text(BATCH_SCRIPT)
    (tmp_path / "setup.sh").write_text("export SITE_SETUP=sourced\n")
    submitter.env.update({"DSD_REPO": str(REPO), "DSD_SETUP": str(tmp_path / "setup.sh")})
    proc = submitter.start(tmp_path / "batch.sh", "dsd-usr1", TWO_NODES, [str(tmp_path / "task.sh")])
    poll("both tasks ready", lambda: submitter.job_log("dsd-usr1").count(" ready") == 2 or proc.poll() is not None,
         timeout_s=60)
    job_id = submitter.job_id("dsd-usr1")
    submitter.cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    job = submitter.finish(proc, "dsd-usr1", timeout_s=120)

    assert job.returncode == 0, job.explain()
    assert f"task 0/2 on {NODES[0]} got USR1" in job.log, job.explain()
    assert f"task 1/2 on {NODES[1]} got USR1" in job.log, job.explain()
    assert "requeueing job" in job.log, job.explain()
    port = 20000 + int(job_id) % 12000
    for rank, node in enumerate(NODES):
        resumed = f"task {rank}/2 local 0/1 on {node} master {NODES[0]}:{port} resumed, setup=sourced"
        assert resumed in job.log, job.explain()


FAILING_TASK = """
if [[ $RANK == 1 ]]; then
  echo "task 1 run ${SLURM_RESTART_COUNT:-0} exits $TASK_EXIT"
  exit "$TASK_EXIT"
fi
for _ in $(seq 600); do sleep 0.1; done  # rank 0 waits for its peer, as in a collective
"""


@pytest.mark.parametrize("task_exit, runs", [(1, 2), (2, 1)], ids=["crash-past-the-limit", "config-error"])
def test_failed_task_requeue(submitter, tmp_path, task_exit, runs):
    """Two tasks; rank 1 fails, srun kills rank 0 (exit 143 from srun either way). With
    DSD_MAX_RESTARTS=1 a crash (1) is requeued once, then the job fails; a config error (2) never is."""
    (tmp_path / "task.sh").write_text(FAILING_TASK)
    (tmp_path / "batch.sh").write_text(BATCH_SCRIPT)
    submitter.env.update({"DSD_REPO": str(REPO), "DSD_MAX_RESTARTS": "1", "TASK_EXIT": str(task_exit)})
    job = submitter.run(tmp_path / "batch.sh", "dsd-fail", ONE_NODE_TWO_TASKS, [str(tmp_path / "task.sh")], timeout_s=120)

    assert job.returncode == (143 if task_exit == 1 else 2), job.explain()
    assert [f"task 1 run {run} exits {task_exit}" in job.log for run in range(3)] == [r < runs for r in range(3)], \
        job.explain()
    if task_exit == 1:
        assert "restart 1 of DSD_MAX_RESTARTS=1; requeueing job" in job.log, job.explain()
        assert "not requeued: the job has already been restarted 1 time(s) (DSD_MAX_RESTARTS=1)" in job.log, job.explain()
    else:
        assert "srun exit code 143, but a task exited with 2" in job.log, job.explain()
        assert "tasks stopped with exit code 2 (a config error); not requeued" in job.log, job.explain()
