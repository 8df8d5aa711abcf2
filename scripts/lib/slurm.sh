# shellcheck shell=bash
# Shared by scripts/*.slurm, sourced in the batch shell (which runs on the first node of the job):
# repository set-up, the rendezvous address, and srun with preemption handling. See docs/slurm.md.
# The per-task side (Slurm ids -> RANK/LOCAL_RANK/WORLD_SIZE) is scripts/lib/slurm_task.sh, which
# sources this file for dsd_tasks_on_node (only functions and constants are defined at the top level).

DSD_EXIT_PREEMPTED=75 # ds_diffusers.preemption.EXIT_PREEMPTED: checkpoint saved, start again to continue
DSD_EXIT_INTERRUPTED=130 # ds_diffusers.preemption.EXIT_INTERRUPTED: stopped by the user (SIGINT), saved or abandoned
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
# jobs sharing a node do not collide and a requeued job (same id) gets the same port back; it stays
# in 20000-31999, below Linux's ephemeral range (32768-60999), where the kernel hands out the local
# ports of outgoing connections and could already have taken it.
dsd_master_port() {
  echo $((20000 + $1 % 12000))
}

dsd_rendezvous() {
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
  MASTER_PORT="${DSD_MASTER_PORT:-$(dsd_master_port "$SLURM_JOB_ID")}"
  export MASTER_ADDR MASTER_PORT
  dsd_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_JOB_NUM_NODES} node(s)" \
    "[$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd' ')], $(dsd_tasks_in_job) task(s)," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT"
  # What reaches NCCL (interface, debug level) is the first thing to check when ranks hang at start.
  local nccl
  nccl="$(env | grep '^NCCL_' | sort | paste -sd' ' || true)"
  [[ -z "$nccl" ]] || dsd_log "NCCL settings: $nccl"
}

# One count per node of this allocation, from e.g. SLURM_TASKS_PER_NODE="2(x3),1" -> "2 2 2 1".
# Inside a task the step's own layout (SLURM_STEP_TASKS_PER_NODE) wins.
dsd_tasks_per_node() {
  local spec="${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}" item count repeat
  local -a items counts=()
  IFS=, read -ra items <<<"$spec"
  for item in "${items[@]}"; do
    count="${item%%(*}"
    repeat=1
    if [[ "$item" == *"(x"* ]]; then
      repeat="${item#*(x}"
      repeat="${repeat%)}"
    fi
    for ((; repeat > 0; repeat--)); do counts+=("$count"); done
  done
  echo "${counts[*]}"
}

# Tasks of this job on node NODE (default: this task's node).
dsd_tasks_on_node() {
  local node="${1:-${SLURM_STEP_NODEID:-${SLURM_NODEID:-0}}}"
  local -a counts
  read -ra counts <<<"$(dsd_tasks_per_node)"
  echo "${counts[node]:-1}"
}

# Tasks of this run's allocation on all its nodes. Not SLURM_NTASKS: a requeued job starts again with
# the environment it was submitted with, so after a requeue onto fewer nodes SLURM_NTASKS can still
# be the submitted count (Slurm 22.05, a 2-node job shrunk to 1 node while pending: SLURM_NTASKS=2,
# SLURM_TASKS_PER_NODE=1, and a plain srun starts 2 tasks on the one node).
dsd_tasks_in_job() {
  local count total=0
  for count in $(dsd_tasks_per_node); do total=$((total + count)); done
  echo "$total"
}

# One task drives one GPU, so the GPUs the job got on a node (--gres=gpu:N, --gpus-per-node,
# --gpus-per-task) must equal the tasks started there (--ntasks-per-node). #SBATCH lines cannot share
# a variable, so instead of trusting two numbers to be edited together this checks them in the batch
# shell (first node) before anything starts, and stops the job (exit 2) naming both. No GPUs: no check.
dsd_check_gpus_per_node() {
  local gpus=0 tasks
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    gpus="$SLURM_GPUS_ON_NODE"
  elif [[ -n "${SLURM_JOB_GPUS:-}" ]]; then
    gpus=$(( $(tr -cd , <<<"$SLURM_JOB_GPUS" | wc -c) + 1 ))
  fi
  ((gpus > 0)) || return 0
  tasks="$(dsd_tasks_on_node 0)"
  if ((gpus != tasks)); then
    echo "ds-diffusers: this job has $gpus GPU(s) on its first node but starts $tasks task(s) there" \
      "(--ntasks-per-node=${SLURM_NTASKS_PER_NODE:-$tasks}); one task drives one GPU: submit with the same N for both," \
      "e.g. sbatch --gres=gpu:$gpus --ntasks-per-node=$gpus, or edit the two #SBATCH lines together" >&2
    exit 2
  fi
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

# srun's own line about a task that exited with a code, e.g.
#   srun: error: node1: task 1: Exited with exit code 2     (also "tasks 0-3: ...")
DSD_TASK_EXIT_LINE='^srun: error: .*: tasks? [0-9,-]+: Exited with exit code [0-9]+$'
DSD_TASK_EXIT_END="# srun stderr closed"

# Start one task per allocated slot through scripts/lib/slurm_task.sh and wait for all of them.
# Returns why the step ended (dsd_step_exit_code). A trapped signal interrupts `wait`, so wait again
# until srun is gone.
dsd_srun() {
  local rc=0 exits
  local -a cpus=()
  # srun does not take --cpus-per-task from the job on every Slurm version; pass it explicitly.
  [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  exits="$(mktemp "${TMPDIR:-/tmp}/dsd-srun-exits.XXXXXX")"
  # --kill-on-bad-exit: one failed rank ends the step at once instead of leaving its peers blocked
  # in a collective until the process-group timeout. --label prefixes each line with its rank.
  # srun's stderr still goes to the job log; a copy of its task-exit lines goes to $exits (the
  # filter ignores USR1: were it killed, srun would die of SIGPIPE on its next error line).
  # --nodes/--ntasks: this run's allocation, which a requeued job may have got smaller or larger
  # than its first run's; srun would otherwise take SLURM_NTASKS, which can be stale (dsd_tasks_in_job).
  srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$(dsd_tasks_in_job)" --kill-on-bad-exit=1 --label "${cpus[@]}" \
    bash "$PWD/scripts/lib/slurm_task.sh" "$@" \
    2> >(trap '' USR1; tee >(grep -E "$DSD_TASK_EXIT_LINE" >"$exits"; echo "$DSD_TASK_EXIT_END" >>"$exits") >&2) &
  DSD_SRUN_PID=$!
  wait "$DSD_SRUN_PID" || rc=$?
  # An exited but unreaped srun still answers kill -0, so no exit status is lost in between.
  while kill -0 "$DSD_SRUN_PID" 2>/dev/null; do
    rc=0
    wait "$DSD_SRUN_PID" || rc=$?
  done
  DSD_SRUN_PID=""
  # The filter finishes once srun's stderr is closed; bounded, in case it was killed.
  local tries
  for ((tries = 0; tries < 100; tries++)); do
    grep -qxF "$DSD_TASK_EXIT_END" "$exits" && break
    sleep 0.1
  done
  local step_rc
  step_rc="$(dsd_step_exit_code "$rc" "$exits")"
  rm -f "$exits"
  ((step_rc == rc)) || dsd_log "srun exit code $rc, but a task exited with $step_rc and srun then stopped its peers: using $step_rc"
  return "$step_rc"
}

# Why a step ended, from srun's exit code RC and its task-exit lines in FILE. srun returns the highest
# of its tasks' codes, counting a task killed by a signal as 128+signal, so when one rank stops in
# order (2: config error, 3: training stopped, 75: preempted, 130: interrupted) before its peers and srun kills them
# (--kill-on-bad-exit), it returns 143 or 137, which would read as a crash. An orderly code that any
# task exited with wins, in that order.
dsd_step_exit_code() {
  local rc="$1" file="$2" code
  if ((rc != 0)); then
    for code in 2 3 "$DSD_EXIT_PREEMPTED" "$DSD_EXIT_INTERRUPTED"; do
      if grep -Eq "Exited with exit code $code\$" "$file"; then
        echo "$code"
        return
      fi
    done
  fi
  echo "$rc"
}

# Whether a job whose tasks ended with exit code RC is requeued; prints why. Returns 0 to requeue.
#   dsd_requeue_reason RC GOT_USR1 GOT_TERM RESTART_COUNT MAX_RESTARTS
# Preemption (exit 75, or any failure after USR1 was forwarded) always requeues. A crash (NCCL
# timeout, a lost node or rank: any other non-zero code) requeues while the job has been restarted
# fewer than MAX_RESTARTS times. Never: success, a config error (2), a stopped training (3: it would
# stop again), an interrupt (130: the user sent SIGINT, e.g. scancel --signal=INT), or a TERM (scancel, the time limit: what happens then is Slurm's call).
dsd_requeue_reason() {
  local rc="$1" got_usr1="$2" got_term="$3" restarts="$4" max="$5"
  if ((rc == 0)); then
    echo "tasks finished"
    return 1
  fi
  if ((got_term)); then
    echo "tasks stopped with exit code $rc after TERM; not requeued"
    return 1
  fi
  if ((rc == DSD_EXIT_PREEMPTED || got_usr1)); then
    echo "tasks stopped for preemption (exit code $rc)"
    return 0
  fi
  if ((rc == 2 || rc == 3)); then
    echo "tasks stopped with exit code $rc ($( ((rc == 2)) && echo "a config error" || echo "training stopped")); not requeued"
    return 1
  fi
  if ((rc == DSD_EXIT_INTERRUPTED)); then
    echo "tasks stopped with exit code $rc (interrupted by SIGINT); not requeued"
    return 1
  fi
  if ((restarts < max)); then
    echo "tasks failed with exit code $rc (a crash); restart $((restarts + 1)) of DSD_MAX_RESTARTS=$max"
    return 0
  fi
  echo "tasks failed with exit code $rc (a crash); not requeued: the job has already been restarted $restarts time(s)" \
    "(DSD_MAX_RESTARTS=$max)"
  return 1
}

# dsd_srun, plus requeueing this job when dsd_requeue_reason says so; the requeued job resumes from
# `latest` when it starts again (the caller passes resume_from_checkpoint=latest). Exits the batch shell.
dsd_srun_preemptible() {
  local rc=0 reason max="${DSD_MAX_RESTARTS:-3}"
  if [[ ! "$max" =~ ^[0-9]+$ ]]; then
    echo "ds-diffusers: DSD_MAX_RESTARTS=$max: must be a whole number >= 0 (default 3), the crash requeues allowed" >&2
    exit 2
  fi
  if ((DSD_GOT_USR1)); then
    rc=$DSD_EXIT_PREEMPTED
  else
    dsd_srun "$@" || rc=$?
  fi
  if ! reason="$(dsd_requeue_reason "$rc" "$DSD_GOT_USR1" "$DSD_GOT_TERM" "${SLURM_RESTART_COUNT:-0}" "$max")"; then
    dsd_log "$reason"
    exit "$rc"
  fi
  dsd_log "$reason; requeueing job $SLURM_JOB_ID to resume from the last checkpoint"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    dsd_log "scontrol requeue failed (submitted with --no-requeue, or requeue disabled on this cluster);" \
      "resubmit the same command to resume from the last checkpoint"
    ((DSD_GOT_USR1)) && rc=$DSD_EXIT_PREEMPTED
    exit "$rc"
  fi
  exit 0
}
