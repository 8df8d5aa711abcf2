# shellcheck shell=bash
# Shared by scripts/*.sh (through scripts/lib/launch.sh) and scripts/*.slurm: the command line they
# all take, [CFG] [ARGS...], and what the default cfg needs before it runs. Only functions are defined.

# dsd_split_args [CFG] [ARGS...]: DSD_CFG is the first argument when it does not start with --
# (default cfg/default.json); DSD_ARGS (an array) holds the rest, for `python -m MODULE --cfg DSD_CFG`.
dsd_split_args() {
  DSD_CFG="cfg/default.json"
  if [[ $# -gt 0 && "$1" != --* ]]; then
    DSD_CFG="$1"
    shift
  fi
  DSD_ARGS=("$@")
}

# The embedded default builds its tiny base model and dataset once (on a cluster, in the shared file
# system), then reuses them; any other cfg file names its own model and data.
dsd_prepare_cfg() {
  if [[ "$1" == "cfg/default.json" ]]; then
    python -m ds_diffusers.embedded --out data/embedded
  fi
}

# True when the arguments already set KEY (as `--set KEY=...` or inside a later `--set` list).
dsd_args_set() {
  local key="$1" arg
  shift
  for arg in "$@"; do
    [[ "$arg" == "$key="* ]] && return 0
  done
  return 1
}
