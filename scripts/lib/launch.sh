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
