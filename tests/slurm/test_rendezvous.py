"""A rank that cannot rendezvous fails within DSD_RENDEZVOUS_TIMEOUT with one line naming
MASTER_ADDR:MASTER_PORT, instead of waiting out the 30-minute collective timeout. No cluster needed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.slurm.cluster import free_port
from tests.slurm.conftest import REPO

pytestmark = pytest.mark.slow
PROBE = """
import sys
from ds_diffusers.distributed import init_distributed
from ds_diffusers.errors import ConfigError
try:
    init_distributed()
except ConfigError as err:
    print(f"ds-diffusers: config error: {err}", file=sys.stderr)
    sys.exit(2)
"""


def join(rank: int, port: int, timeout_s: int, addr: str = "127.0.0.1") -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": addr,
           "MASTER_PORT": str(port), "DSD_RENDEZVOUS_TIMEOUT": str(timeout_s), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - started


@pytest.mark.parametrize("rank", [1, 0], ids=["worker-no-master", "master-no-worker"])
def test_rendezvous_gives_up_with_the_address(rank):
    port = free_port()  # nobody listens there (rank 1), nobody connects there (rank 0)
    result, seconds = join(rank, port, timeout_s=3)
    assert result.returncode == 2, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ds-diffusers: config error: MASTER_ADDR:MASTER_PORT="), result.stderr[-3000:]
    assert f"127.0.0.1:{port}" in last_line and "DSD_RENDEZVOUS_TIMEOUT" in last_line
    # Import time plus the timeout and torch's retry back-off; nowhere near the 1800 s collective timeout.
    assert seconds < 60, f"took {seconds:.0f} s"
