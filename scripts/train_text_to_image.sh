#!/usr/bin/env bash
# Train locally with the deepspeed launcher.
#   bash scripts/train_text_to_image.sh                       # embedded default (tiny model + data, CPU-friendly)
#   bash scripts/train_text_to_image.sh cfg/sd15_lora.json --set train_micro_batch_size_per_gpu=2
# One process per GPU when GPUs are visible, else one CPU process (NUM_PROCS overrides).
# Output is shown and also written to log/train-<time>.log.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
mkdir -p log

cfg="cfg/default.json"
if [[ $# -gt 0 && "$1" != --* ]]; then
  cfg="$1"
  shift
fi
# The embedded default builds its tiny base model and dataset once, then reuses them.
if [[ "$cfg" == "cfg/default.json" ]]; then
  python -m ds_diffusers.embedded --out data/embedded
fi

. "$repo/scripts/lib/launch.sh"
procs="$(dsd_num_procs)"
dsd_export_threads "$procs"
log="log/train-$(date +%Y%m%d-%H%M%S).log"
echo "ds-diffusers: $procs process(es), cfg $cfg, log $log"
deepspeed $(dsd_launcher_args "$procs") --module ds_diffusers.train --cfg "$cfg" "$@" 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
