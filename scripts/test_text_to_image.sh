#!/usr/bin/env bash
# Sample from a trained model locally with the deepspeed launcher (prompts sharded over the processes).
#   bash scripts/test_text_to_image.sh                        # embedded default
#   bash scripts/test_text_to_image.sh cfg/sd15_lora.json --set output_dir=outputs/sd15_lora/model
# One process per GPU when GPUs are visible, else one CPU process (NUM_PROCS overrides).
# Output is shown and also written to log/test-<time>.log. On a cluster: scripts/test_text_to_image.slurm.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
mkdir -p log

cfg="cfg/default.json"
if [[ $# -gt 0 && "$1" != --* ]]; then
  cfg="$1"
  shift
fi
if [[ "$cfg" == "cfg/default.json" ]]; then
  python -m ds_diffusers.embedded --out data/embedded
fi

. "$repo/scripts/lib/launch.sh"
procs="$(dsd_num_procs)"
dsd_export_threads "$procs"
log="log/test-$(date +%Y%m%d-%H%M%S).log"
echo "ds-diffusers: $procs process(es), cfg $cfg, log $log"
# shellcheck disable=SC2046  # the launcher arguments are meant to split into words
deepspeed $(dsd_launcher_args "$procs") --module ds_diffusers.sample --cfg "$cfg" "$@" 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
