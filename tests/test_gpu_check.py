"""bench/gpu_check.sh is ready for the day a GPU is lent: its dry run checks its own plan on a CPU."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_validates_every_planned_run(tmp_path):
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--work-dir", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    planned = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(planned) == 9 and "plan ok" in result.stdout
    # No 16-bit run of the plan reaches DeepSpeed's stage-0 fp16/bf16 wrappers (their loss scaling is broken).
    assert all("engine ZeRO-0" not in line for line in planned)
    assert any("float16," in line for line in planned), "the fp16 learning check must be in the plan"
    # The HF example runs at the settings of one of ours, so the report's ratio compares like with like.
    peer = next(line for line in planned if "HF example" in line)
    ours = next(line for line in planned if line.startswith("  sd15-full-bf16-zero2-512px-mb8-uncached:"))
    assert peer.split(", ")[-2:] == ours.split(", ")[-2:]
    assert list(tmp_path.iterdir()) == [], "a dry run builds and writes nothing"
