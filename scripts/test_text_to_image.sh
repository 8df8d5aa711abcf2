#!/usr/bin/env bash
# Sample from a trained model locally: one process directly, several through the deepspeed launcher
# (prompts sharded over the processes).
#   bash scripts/test_text_to_image.sh                        # embedded default
#   bash scripts/test_text_to_image.sh cfg/sd15_lora.json --set output_dir=outputs/sd15_lora/model
# One process per GPU when GPUs are visible, else one CPU process (NUM_PROCS overrides).
# Output is shown and also written to log/test-<time>.log. On a cluster: scripts/test_text_to_image.slurm.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
. "$repo/scripts/lib/launch.sh"
dsd_launch ds_diffusers.sample test "$@"
