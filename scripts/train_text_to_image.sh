#!/usr/bin/env bash
# Train locally: one process directly, several through the deepspeed launcher.
#   bash scripts/train_text_to_image.sh                       # embedded default (tiny model + data, CPU-friendly)
#   bash scripts/train_text_to_image.sh cfg/sd15_lora.json --set train_micro_batch_size_per_gpu=2
# One process per GPU when GPUs are visible, else one CPU process (NUM_PROCS overrides).
# Output is shown and also written to log/train-<time>.log. On a cluster: scripts/train_text_to_image.slurm.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
. "$repo/scripts/lib/launch.sh"
dsd_launch ds_diffusers.train train "$@"
