#!/usr/bin/env bash
# Build the encoder caches of a cfg file ahead of training, one process per visible GPU (or one on
# the CPU): bash scripts/prepare_cache.sh cfg/sd15_full.json [--set KEY=VALUE ...]
# Training with the same cfg then reuses them at any process count (docs/data.md).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
. "$repo/scripts/lib/launch.sh"
dsd_launch ds_diffusers.cache cache "$@"
