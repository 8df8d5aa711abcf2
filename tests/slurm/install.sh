#!/usr/bin/env bash
# Install what the local Slurm cluster tests need (Debian/Ubuntu, as root): slurmctld, slurmd,
# the client commands (sbatch, srun, scontrol, sinfo) and munge. Idempotent: does nothing when the
# binaries are already there. The tests themselves install nothing and skip loudly without these.
set -euo pipefail
need=(slurmctld slurmd sbatch srun scontrol sinfo munged mungekey)
missing=0
for bin in "${need[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || missing=1
done
if [[ $missing -eq 0 ]]; then
  echo "tests/slurm/install.sh: slurm-wlm and munge already installed"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "tests/slurm/install.sh: needs root (apt-get); the Slurm tests will be skipped" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# The packages' postinst scripts try to start the daemons; there is no init system in CI
# containers, and the tests start their own, so a failing service start is not an error here.
apt-get install -y -q --no-install-recommends slurm-wlm munge
