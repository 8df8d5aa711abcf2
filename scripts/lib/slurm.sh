# shellcheck shell=bash
# Shared by scripts/*.slurm, sourced in the batch shell (which runs on the first node of the job):
# repository set-up, the rendezvous address, and srun with preemption handling. See the Slurm section of README.md.
# The per-task side (Slurm ids -> RANK/LOCAL_RANK/WORLD_SIZE) is scripts/lib/slurm_task.sh.

DSD_EXIT_PREEMPTED=75 # ds_diffusers.preemption.EXIT_PREEMPTED: checkpoint saved, start again to continue
DSD_GOT_USR1=0
DSD_GOT_TERM=0
DSD_SRUN_PID=""

dsd_log() {
  echo "ds-diffusers: $*"
}

# Run from the repository, make sure log/ exists, then the site's own set-up (modules, conda, venv).
dsd_enter_repo() {
  cd "$1" || exit 2
  # slurmd opened --output=log/... before this script ran (so log/ is tracked in git); runs
  # submitted with another --output still get log/ for anything written there later.
  mkdir -p log
  if [[ -n "${DSD_SETUP:-}" ]]; then
    [[ -f "$DSD_SETUP" ]] || { echo "ds-diffusers: DSD_SETUP=$DSD_SETUP: no such file" >&2; exit 2; }
    # Module and conda activation scripts read unset variables; do not let `set -u` abort them.
    set +u
    # shellcheck disable=SC1090
    source "$DSD_SETUP"
    set -u
  fi
}

# The first host of the allocation hosts the rendezvous store (rank 0 runs there: srun's default
# block distribution gives task 0 to the first node). The port is derived from the job id, so two
# jobs sharing a node do not collide and a requeued job (same id) gets the same port back.
dsd_rendezvous() {
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
  MASTER_PORT="${DSD_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
  export MASTER_ADDR MASTER_PORT
  dsd_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_JOB_NUM_NODES} node(s)" \
    "[$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd' ')], ${SLURM_NTASKS} task(s)," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT"
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

_dsd_on_usr1() {
  DSD_GOT_USR1=1
  if [[ -n "$DSD_SRUN_PID" ]]; then
    dsd_log "USR1 received (time limit near or preemption): asking every task to save a checkpoint and stop"
    # srun passes USR1 on to every task of its step, on every node.
    kill -USR1 "$DSD_SRUN_PID" 2>/dev/null || true
  else
    dsd_log "USR1 received before the tasks started: the job will be requeued without starting them"
  fi
}

_dsd_on_term() {
  # scancel or a scheduler preemption: slurmstepd signals the tasks itself. The batch shell stays
  # alive so they can finish their checkpoint within KillWait; what happens next is Slurm's call.
  DSD_GOT_TERM=1
  dsd_log "TERM received: waiting for the tasks to save and stop"
}

# Install before any slow set-up: a USR1 that hits the batch shell without a trap kills it (and
# with it the job) before anything is saved.
dsd_trap_preemption() {
  trap _dsd_on_usr1 USR1
  trap _dsd_on_term TERM
}

# Start one task per allocated slot through scripts/lib/slurm_task.sh and wait for all of them.
# Returns the step's exit code. A trapped signal interrupts `wait`, so wait again until srun is gone.
dsd_srun() {
  local rc=0
  local -a cpus=()
  # srun does not take --cpus-per-task from the job on every Slurm version; pass it explicitly.
  [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  # --kill-on-bad-exit: one failed rank ends the step at once instead of leaving its peers blocked
  # in a collective until the process-group timeout. --label prefixes each line with its rank.
  srun --kill-on-bad-exit=1 --label "${cpus[@]}" bash "$PWD/scripts/lib/slurm_task.sh" "$@" &
  DSD_SRUN_PID=$!
  wait "$DSD_SRUN_PID" || rc=$?
  # An exited but unreaped srun still answers kill -0, so no exit status is lost in between.
  while kill -0 "$DSD_SRUN_PID" 2>/dev/null; do
    rc=0
    wait "$DSD_SRUN_PID" || rc=$?
  done
  DSD_SRUN_PID=""
  return "$rc"
}

# dsd_srun, plus: when the tasks stopped on a preemption request (exit 75 after saving, or any
# failure after the batch shell got USR1), requeue this job; it resumes from `latest` when it starts
# again (the caller passes resume_from_checkpoint=latest). Exits the batch shell.
dsd_srun_preemptible() {
  local rc=0
  if ((DSD_GOT_USR1)); then
    rc=$DSD_EXIT_PREEMPTED
  else
    dsd_srun "$@" || rc=$?
  fi
  if ((rc == 0)); then
    dsd_log "tasks finished"
    exit 0
  fi
  if ((DSD_GOT_TERM)) || { ((rc != DSD_EXIT_PREEMPTED)) && ((!DSD_GOT_USR1)); }; then
    dsd_log "tasks stopped with exit code $rc"
    exit "$rc"
  fi
  dsd_log "tasks stopped for preemption (exit code $rc); requeueing job $SLURM_JOB_ID to resume from the last checkpoint"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    dsd_log "scontrol requeue failed (submitted with --no-requeue, or requeue disabled on this cluster);" \
      "resubmit the same command to resume from the last checkpoint"
    exit "$DSD_EXIT_PREEMPTED"
  fi
  exit 0
}
