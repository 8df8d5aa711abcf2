#!/usr/bin/env bash
# One Slurm task = one training (or sampling) process. `srun` starts this wrapper once per task on
# every node; it maps Slurm's task ids to the variables torch.distributed and DeepSpeed read, then
# becomes the command (`exec`, so a forwarded USR1/TERM reaches Python itself, not a shell).
#   srun bash scripts/lib/slurm_task.sh python -m ds_diffusers.train --cfg cfg/default.json
# MASTER_ADDR and MASTER_PORT come from the batch script (scripts/lib/slurm.sh: dsd_rendezvous).
set -euo pipefail

# Shared helpers (dsd_tasks_on_node).
. "$(dirname "${BASH_SOURCE[0]}")/slurm.sh"

: "${SLURM_PROCID:?not inside an srun task; start this through srun (see scripts/train_text_to_image.slurm)}"
: "${MASTER_ADDR:?set by the batch script (dsd_rendezvous in scripts/lib/slurm.sh)}"
: "${MASTER_PORT:?set by the batch script (dsd_rendezvous in scripts/lib/slurm.sh)}"
export RANK="$SLURM_PROCID"
export LOCAL_RANK="$SLURM_LOCALID"
export WORLD_SIZE="${SLURM_STEP_NUM_TASKS:-$SLURM_NTASKS}"
# DeepSpeed's CPU shared-memory all-reduce is used only when LOCAL_SIZE equals the world size (all
# ranks on one node); torchrun-style code reads LOCAL_WORLD_SIZE.
LOCAL_SIZE="$(dsd_tasks_on_node)"
export LOCAL_SIZE LOCAL_WORLD_SIZE="$LOCAL_SIZE"
# One BLAS/OpenMP thread pool per task sized to its CPUs, not to the whole node.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
exec "$@"
