# Shared by scripts/*.sh: how many processes and which launcher arguments for this machine.

# One process per visible GPU; one process on a CPU-only machine. NUM_PROCS overrides.
dsd_num_procs() {
  if [[ -n "${NUM_PROCS:-}" ]]; then
    echo "$NUM_PROCS"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 1
  fi
}

# A free port for the rendezvous, so two local runs do not collide on the default 29500.
dsd_free_port() {
  python - <<'PY'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
PY
}

# Split the CPU cores between the processes unless the user chose: two processes each using every
# core slow each other down several times over.
dsd_export_threads() {
  if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    local cores
    cores="$(nproc)"
    export OMP_NUM_THREADS=$(( cores / $1 > 0 ? cores / $1 : 1 ))
  fi
}

dsd_launcher_args() {
  echo "--num_gpus $1 --master_port ${MASTER_PORT:-$(dsd_free_port)}"
}

# Shared body of scripts/train_text_to_image.sh and scripts/test_text_to_image.sh:
#   dsd_launch MODULE LOG_PREFIX [CFG] [ARGS...]
# The first argument not starting with -- is the cfg file (default cfg/default.json, whose tiny model
# and data are built once on first use); the rest goes to `python -m MODULE`. Output is shown and
# written to log/<prefix>-<time>.log; the exit code is the launcher's.
dsd_launch() {
  local module="$1" prefix="$2" cfg="cfg/default.json" procs log
  shift 2
  if [[ $# -gt 0 && "$1" != --* ]]; then
    cfg="$1"
    shift
  fi
  if [[ "$cfg" == "cfg/default.json" ]]; then
    python -m ds_diffusers.embedded --out data/embedded
  fi
  procs="$(dsd_num_procs)"
  dsd_export_threads "$procs"
  mkdir -p log
  log="log/${prefix}-$(date +%Y%m%d-%H%M%S).log"
  echo "ds-diffusers: $procs process(es), cfg $cfg, log $log"
  if [[ "$procs" -eq 1 ]]; then
    # One process needs no launcher: the module forms a process group of one itself, and skipping
    # the launcher's two extra Python processes (each importing torch and deepspeed) saves ~5 s.
    python -m "$module" --cfg "$cfg" "$@" 2>&1 | tee "$log"
  else
    # shellcheck disable=SC2046  # the launcher arguments are meant to split into words
    deepspeed $(dsd_launcher_args "$procs") --module "$module" --cfg "$cfg" "$@" 2>&1 | tee "$log"
  fi
  return "${PIPESTATUS[0]}"
}
