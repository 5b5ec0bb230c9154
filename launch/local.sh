#!/usr/bin/env bash
# N JAX processes on this machine (coordinator on 127.0.0.1): try a multi-host run without a
# cluster, each process with its own CPU devices.
#
#   launch/local.sh [--processes=2] [--devices-per-process=1] [--port=PORT] [--dry-run] \
#       -- --config=configs/fr.py:tiny --workdir=/tmp/run
#   launch/local.sh --processes=2 --exec -- python3 -c 'import jax; ...'   # any command
#
# Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N and
# JAX_PROCESS_ID=i (read by vigface_jax.parallel.maybe_initialize_distributed), and, on CPU,
# XLA_FLAGS=--xla_force_host_platform_device_count=K. Output lines are prefixed [p<i>].
# If one process fails the others are stopped and its exit status is returned; --timeout=S
# (default 0: none) stops all of them after S seconds (exit status 124).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/_lib.sh
source "$HERE/_lib.sh"

PROCESSES=2
DEVICES=1
PORT=""
EXEC=0
TIMEOUT=0
PYTHON=${PYTHON:-python3}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes=*) PROCESSES=${1#*=} ;;
    --devices-per-process=*) DEVICES=${1#*=} ;;
    --port=*) PORT=${1#*=} ;;
    --timeout=*) TIMEOUT=${1#*=} ;;
    --exec) EXEC=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (options take the form --name=value, then -- and the job; see --help)" ;;
  esac
  shift
done
for v in PROCESSES DEVICES TIMEOUT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "--${v,,}=${!v}: a whole number is needed"
done
[[ "$PROCESSES" -ge 1 && "$DEVICES" -ge 1 ]] || die "--processes and --devices-per-process must be >= 1"
[[ $# -gt 0 ]] || die "nothing to run: give the main job's arguments (or --exec and a command) after --"
if [[ -z "$PORT" ]]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port=$PORT: a port number is needed"

if [[ "$EXEC" == 1 ]]; then
  CMD=("$@")
else
  CMD=("$PYTHON" -m vigface_jax.main "$@")
fi
XLA="${XLA_FLAGS:-}${XLA_FLAGS:+ }--xla_force_host_platform_device_count=$DEVICES"

PIDS=()
TIMED_OUT=0
# Each process runs in its own process group (set -m), so stopping one stops its pipeline.
stop_all() {
  for pid in "${PIDS[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
}
trap 'stop_all' INT TERM
trap 'TIMED_OUT=1; stop_all' USR1
set -m

for ((i = 0; i < PROCESSES; i++)); do
  ENV=(env JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$PROCESSES"
       JAX_PROCESS_ID="$i" XLA_FLAGS="$XLA")
  if [[ "$DRY_RUN" == 1 ]]; then
    show "${ENV[@]}" "${CMD[@]}"
    continue
  fi
  show "${ENV[@]}" "${CMD[@]}"
  # Line-prefixed output; the subshell's status is the command's (pipefail).
  ( "${ENV[@]}" "${CMD[@]}" 2>&1 | sed -u "s/^/[p$i] /" ) &
  PIDS+=("$!")
done
if [[ "$DRY_RUN" == 1 ]]; then
  exit 0
fi

if [[ "$TIMEOUT" -gt 0 ]]; then  # in its own group too, so stopping it stops its sleep
  ( sleep "$TIMEOUT"; echo "local.sh: --timeout=$TIMEOUT s reached; stopping" >&2; kill -USR1 $$ ) &
  WATCHDOG=$!
fi
set +m  # the groups are made; no job-control notices from here on
STATUS=0
# Wait for whichever process ends first; on the first failure stop the rest (a lone survivor
# would wait for its peers at a collective until JAX's heartbeat timeout).
LEFT=("${PIDS[@]}")
while [[ ${#LEFT[@]} -gt 0 ]]; do
  rc=0
  DONE=""
  wait -n -p DONE "${LEFT[@]}" || rc=$?
  if [[ -z "${DONE:-}" ]]; then
    if [[ "$rc" == 127 ]]; then  # nothing left to wait for
      break
    fi
    continue  # interrupted by a signal (stop_all has run): wait for the rest
  fi
  REST=()
  for pid in "${LEFT[@]}"; do
    if [[ "$pid" != "$DONE" ]]; then
      REST+=("$pid")
    fi
  done
  LEFT=("${REST[@]}")
  if [[ "$rc" != 0 && "$STATUS" == 0 && "$TIMED_OUT" == 0 ]]; then
    STATUS=$rc
    echo "local.sh: a process exited with status $rc; stopping the others" >&2
    stop_all
  fi
done
if [[ -n "${WATCHDOG:-}" ]]; then
  kill -- "-$WATCHDOG" 2>/dev/null || true
fi
if [[ "$TIMED_OUT" == 1 ]]; then
  exit 124
fi
exit "$STATUS"
