"""Fixtures for the Slurm tests: a local two-node cluster (cluster.py) for the session, and a helper
that submits a real `.slurm` script with `sbatch --wait` the way a user would."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.slurm.cluster import LocalCluster, poll, skip_reason

REPO = Path(__file__).resolve().parents[2]
RANK_LINE = re.compile(r"ds-diffusers: rank (\d+)/(\d+) on (\S+)")
_skipped: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    # A skipped cluster is easy to miss in `pytest -q` output; say it in the summary.
    if _skipped:
        terminalreporter.write_sep("!", f"Slurm cluster tests SKIPPED: {_skipped[0]}", yellow=True, bold=True)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> LocalCluster:
    reason = skip_reason()
    if reason:
        _skipped.append(reason)
        pytest.skip(reason)
    cluster = LocalCluster(tmp_path_factory.mktemp("slurm"), cpus_per_node=2)
    cluster.start()
    yield cluster
    cluster.stop()


@dataclass
class Job:
    returncode: int
    log: str
    log_path: Path

    def ranks(self) -> set[tuple[int, int]]:
        """(rank, world size) pairs the processes printed at start."""
        return {(int(m.group(1)), int(m.group(2))) for m in RANK_LINE.finditer(self.log)}

    def explain(self) -> str:
        return f"exit {self.returncode}; {self.log_path}:\n{self.log[-6000:]}"


class Submitter:
    """Submits scripts from a folder outside the repository, as a user would from anywhere; the
    job log goes to that folder (the scripts' own default is the repository's log/)."""

    def __init__(self, cluster: LocalCluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        # OMP_NUM_THREADS is not set here: slurm_task.sh derives it from --cpus-per-task (1).
        # DSD_ALLOW_CPU: this cluster has no GPUs; a Slurm job refuses to run on the CPU without it.
        self.env = {"PYTHONUNBUFFERED": "1", "DSD_RENDEZVOUS_TIMEOUT": "120", "DSD_ALLOW_CPU": "1"}

    def command(self, script: Path, name: str, sbatch_args: list[str], script_args: list[str]) -> list[str]:
        return ["sbatch", "--wait", f"--job-name={name}", f"--output={self.workdir}/%x-%j.out", "--cpus-per-task=1",
                *sbatch_args, str(script), *script_args]

    def start(self, script: Path, name: str, sbatch_args: list[str], script_args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(self.command(script, name, sbatch_args, script_args), cwd=self.workdir,
                                env={**self.cluster.env, **self.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def finish(self, proc: subprocess.Popen, name: str, timeout_s: float) -> Job:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.cluster.run("scancel", f"--name={name}", check=False)
            proc.wait(60)
            pytest.fail(f"job {name} still running after {timeout_s:.0f} s; cancelled.\n{self.job_log(name)}")
        return Job(proc.returncode, self.job_log(name), self.log_path(name))

    def run(self, script: Path, name: str, sbatch_args: list[str], script_args: list[str], timeout_s: float) -> Job:
        return self.finish(self.start(script, name, sbatch_args, script_args), name, timeout_s)

    def log_path(self, name: str) -> Path:
        logs = sorted(self.workdir.glob(f"{name}-*.out"))
        return logs[-1] if logs else self.workdir / f"{name}-NOLOG.out"

    def job_log(self, name: str) -> str:
        path = self.log_path(name)
        # tqdm redraws with carriage returns; lines are easier to read and grep.
        return path.read_text(errors="replace").replace("\r", "\n") if path.exists() else f"(no log {path.name})"

    def job_id(self, name: str, timeout_s: float = 30) -> str:
        return poll(f"job {name} in squeue", lambda: self.cluster.run("squeue", "-h", f"--name={name}", "-o", "%i",
                                                                      check=False).stdout.strip(), timeout_s)


@pytest.fixture
def submitter(slurm_cluster, tmp_path) -> Submitter:
    return Submitter(slurm_cluster, tmp_path)


def write_tiny_cfg(tiny_assets, run_dir: Path, **overrides) -> Path:
    """cfg/default.json shortened for the tiny model: 32 px, micro batch 8, no validation."""
    cfg = json.loads((REPO / "cfg" / "default.json").read_text())
    cfg.update({
        "pretrained_model_name_or_path": str(tiny_assets.model_dir), "dataset_dir": str(tiny_assets.dataset_dir),
        "output_dir": str(run_dir / "model"), "checkpoint_dir": str(run_dir / "checkpoints"),
        "validation_steps": 0, "save_interval": 0, "train_micro_batch_size_per_gpu": 8, "resolution": 32,
        "lr_warmup_steps": 2, "log_every_n_steps": 1, **overrides,  # a metrics line (and stop check) per step
    })
    path = run_dir / "cfg.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def metrics_steps(output_dir: Path) -> list[int]:
    path = output_dir / "logs" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for_steps(output_dir: Path, steps: int, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll the metrics file (bounded) until `steps` optimizer steps are logged."""
    def reached():
        if proc.poll() is not None:
            raise AssertionError(f"sbatch returned ({proc.returncode}) before step {steps}")
        return len(metrics_steps(output_dir)) >= steps

    poll(f"{steps} steps in {output_dir}/logs/metrics.jsonl", reached, timeout_s)
