#!/usr/bin/env bash
# Multi-node GPU runs under SLURM: writes a batch script and submits it with sbatch.
#
#   launch/slurm.sh --nodes=2 --gpus-per-node=8 [--partition=P] [--account=A] [--time=24:00:00]
#       [--job=NAME] [--port=12355] [--per-gpu] [--logs=DIR] [--venv=DIR] [--dry-run] \
#       -- --config=configs/dit.py --config.stage1.workdir=/runs/stage1 --workdir=/runs/stage2
#
# The job runs one JAX process per node (default; each sees all its node's GPUs) or, with
# --per-gpu, one per GPU. Inside the job, before srun starts the processes:
#   JAX_COORDINATOR_ADDRESS = <first host of $SLURM_JOB_NODELIST>:PORT
#   JAX_NUM_PROCESSES       = $SLURM_NTASKS
# and each task sets JAX_PROCESS_ID = $SLURM_PROCID (and, with --per-gpu, JAX_LOCAL_DEVICE_IDS
# = $SLURM_LOCALID), which vigface_jax.parallel passes to jax.distributed.initialize.
# Workers need the CUDA install: pip install -e ".[cuda]" (README "Running on Cloud TPU and
# GPU clusters"); --venv=DIR activates DIR/bin/activate first.
# --dry-run prints the batch script and the sbatch command instead of submitting.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/_lib.sh
source "$HERE/_lib.sh"

NODES=1
GPUS=8
PARTITION=""
ACCOUNT=""
TIME="24:00:00"
JOB=vigface
PORT=12355
PER_GPU=0
LOGS=logs
VENV=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) NODES=${1#*=} ;;
    --gpus-per-node=*) GPUS=${1#*=} ;;
    --partition=*) PARTITION=${1#*=} ;;
    --account=*) ACCOUNT=${1#*=} ;;
    --time=*) TIME=${1#*=} ;;
    --job=*) JOB=${1#*=} ;;
    --port=*) PORT=${1#*=} ;;
    --logs=*) LOGS=${1#*=} ;;
    --venv=*) VENV=${1#*=} ;;
    --per-gpu) PER_GPU=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (options take the form --name=value, then -- and the job; see --help)" ;;
  esac
  shift
done
for v in NODES GPUS PORT; do
  [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -ge 1 ]] || die "--${v,,}=${!v}: a positive whole number is needed"
done
[[ "$JOB" =~ ^[A-Za-z0-9._-]+$ ]] || die "--job=$JOB: letters, digits, '.', '_' and '-' only"
[[ $# -gt 0 ]] || die "give the main job's arguments after --, e.g. -- --config=configs/dit.py --workdir=/runs/stage2"

TASKS_PER_NODE=1
if [[ "$PER_GPU" == 1 ]]; then
  TASKS_PER_NODE=$GPUS
fi
REPO=$(cd "$HERE/.." && pwd)
ARGS=$(quote_words "$@")
LOCAL_IDS=""
if [[ "$PER_GPU" == 1 ]]; then
  LOCAL_IDS='export JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID; '
fi

SCRIPT=$(cat <<EOF
#!/bin/bash
#SBATCH --job-name=$JOB
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$TASKS_PER_NODE
#SBATCH --gpus-per-node=$GPUS
#SBATCH --time=$TIME
#SBATCH --output=$LOGS/%x-%j.out
${PARTITION:+#SBATCH --partition=$PARTITION}
${ACCOUNT:+#SBATCH --account=$ACCOUNT}
set -euo pipefail
cd $(quote_words "$REPO")
${VENV:+source $(quote_words "$VENV")/bin/activate}
head=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads all: no SIGPIPE
export JAX_COORDINATOR_ADDRESS="\$head:$PORT"
export JAX_NUM_PROCESSES="\$SLURM_NTASKS"
echo "vigface_jax: \$SLURM_NTASKS processes on \$SLURM_JOB_NUM_NODES nodes, coordinator \$JAX_COORDINATOR_ADDRESS"
# Per task: its id from SLURM, then the job (its arguments are words of this script).
srun --kill-on-bad-exit=1 bash -c '${LOCAL_IDS}export JAX_PROCESS_ID=\$SLURM_PROCID; exec "\$@"' task \
  "\${PYTHON:-python3}" -m vigface_jax.main $ARGS
EOF
)

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%s\n' "$SCRIPT"
  show sbatch
  exit 0
fi
mkdir -p "$LOGS"
show sbatch
printf '%s\n' "$SCRIPT" | sbatch
