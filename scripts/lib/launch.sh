# Shared by scripts/*.sh: how many processes and which launcher arguments for this machine.

# The command line ([CFG] [ARGS...]) and the embedded default's build.
. "$(dirname "${BASH_SOURCE[0]}")/args.sh"

# The GPUs this run may use, comma-separated: CUDA_VISIBLE_DEVICES when it is set (the deepspeed
# launcher drops that variable unless it gets the ids as --include localhost:2,3), else the indices
# of every GPU nvidia-smi lists. Empty on a machine without GPUs, where CUDA_VISIBLE_DEVICES is left
# for ds-diffusers to refuse (GPUs expected, none found) unless DSD_ALLOW_CPU=1.
dsd_visible_gpus() {
  local count
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    return 0
  fi
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    echo "$CUDA_VISIBLE_DEVICES"
    return 0
  fi
  count="$(nvidia-smi -L | grep -c '^GPU')"
  ((count > 0)) && seq -s, 0 $((count - 1))
  return 0
}

# One process per GPU in $1 (the dsd_visible_gpus list); one process on a CPU-only machine. NUM_PROCS overrides.
dsd_num_procs() {
  local gpus="$1"
  if [[ -n "${NUM_PROCS:-}" ]]; then
    echo "$NUM_PROCS"
  elif [[ -n "$gpus" ]]; then
    echo $(( $(tr -cd , <<<"$gpus" | wc -c) + 1 ))
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

# The deepspeed launcher's arguments for PROCS processes on GPUS (a dsd_visible_gpus list, empty on CPU).
dsd_launcher_args() {
  local procs="$1" gpus="$2" port="${MASTER_PORT:-$(dsd_free_port)}"
  local -a ids
  IFS=, read -ra ids <<<"$gpus"
  if ((${#ids[@]} > 0 && procs > ${#ids[@]})); then
    echo "ds-diffusers: NUM_PROCS=$procs but only ${#ids[@]} GPU(s) to use ($gpus); start at most one process per GPU" >&2
    return 2
  fi
  if ((${#ids[@]} > 0)) && [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    # The launcher ignores CUDA_VISIBLE_DEVICES next to --num_gpus; --include makes it set the
    # variable to exactly these GPUs for its processes. It takes indices, not UUIDs.
    if [[ ! "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
      echo "ds-diffusers: CUDA_VISIBLE_DEVICES=$gpus: the deepspeed launcher takes GPU indices;" \
        "use the numbers \`nvidia-smi -L\` shows, e.g. CUDA_VISIBLE_DEVICES=2,3" >&2
      return 2
    fi
    echo "--include localhost:$(IFS=,; echo "${ids[*]:0:procs}") --master_port $port"
  else
    echo "--num_gpus $procs --master_port $port"
  fi
}

# The command as one line a shell reads back the same; plain words stay unquoted.
dsd_print_command() {
  local arg line=""
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      line+="$arg "
    else
      line+="$(printf '%q' "$arg") "
    fi
  done
  echo "${line% }"
}

# Shared body of scripts/train_text_to_image.sh and scripts/test_text_to_image.sh:
#   dsd_launch MODULE LOG_PREFIX [CFG] [ARGS...]
# The first argument not starting with -- is the cfg file (default cfg/default.json, whose tiny model
# and data are built once on first use); the rest goes to `python -m MODULE`. Output is shown and
# written to log/<prefix>-<time>.log; the exit code is the launcher's. DSD_DRY_RUN=1 prints the
# command instead of running it.
dsd_launch() {
  local module="$1" prefix="$2" gpus procs launcher log
  local -a cmd
  shift 2
  dsd_split_args "$@"
  gpus="$(dsd_visible_gpus)" || return
  procs="$(dsd_num_procs "$gpus")"
  if [[ "$procs" -eq 1 ]]; then
    # One process needs no launcher: the module forms a process group of one itself, and skipping
    # the launcher's two extra Python processes (each importing torch and deepspeed) saves ~5 s.
    # CUDA_VISIBLE_DEVICES, when set, reaches it unchanged.
    cmd=(python -m "$module" --cfg "$DSD_CFG" "${DSD_ARGS[@]}")
  else
    launcher="$(dsd_launcher_args "$procs" "$gpus")" || return
    # shellcheck disable=SC2206  # the launcher arguments are meant to split into words
    cmd=(deepspeed $launcher --module "$module" --cfg "$DSD_CFG" "${DSD_ARGS[@]}")
  fi
  if [[ "${DSD_DRY_RUN:-0}" == 1 ]]; then
    dsd_print_command "${cmd[@]}"
    return 0
  fi
  dsd_prepare_cfg "$DSD_CFG"
  dsd_export_threads "$procs"
  mkdir -p log
  log="log/${prefix}-$(date +%Y%m%d-%H%M%S).log"
  [[ -z "$gpus" ]] || gpus="$(cut -d, -f1-"$procs" <<<"$gpus")"
  echo "ds-diffusers: $procs process(es)${gpus:+ on GPU(s) $gpus}, cfg $DSD_CFG, log $log"
  "${cmd[@]}" 2>&1 | tee "$log"
  return "${PIPESTATUS[0]}"
}
