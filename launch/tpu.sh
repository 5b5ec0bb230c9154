#!/usr/bin/env bash
# Cloud TPU VMs and pod slices for vigface_jax (in the spirit of big_vision's run_tpu.sh).
#
#   launch/tpu.sh [options] <command> [-- args]
#
# Commands (each is one or a few `gcloud` calls, printed before they run):
#   create    create the TPU VM / pod slice (--queued: as a queued resource, which waits for
#             capacity; --spot: a Spot VM, preemptible at 30 s notice)
#   status    describe it (a queued resource's state: WAITING_FOR_RESOURCES ... ACTIVE)
#   delete    delete it (and its queued resource)
#   copy      copy this checkout's HEAD (`git archive`: committed files only) to every worker
#   pull      clone / update --git=URL at --ref=REF on every worker (instead of copy)
#   setup     per-worker environment: pip install -e ".[tpu]" (jax[tpu] at this repo's pin)
#   run -- ARGS
#             on every worker at once: python -m vigface_jax.main ARGS, the output streamed
#             here and appended to ~/vigface_logs/<job>.log on each worker
#   logs      follow that log on one worker (--worker=N, default 0)
#   profile WORKDIR DEST
#             fetch WORKDIR/profile (written by --config.train.profile_steps) from worker 0,
#             or from gs:// when WORKDIR is a bucket path, into the local DEST
#   ssh -- CMD  any shell command on every worker
#
# Options (all --name=value; environment defaults in brackets):
#   --name=TPU_NAME [TPU_NAME]  --zone=ZONE [TPU_ZONE]  --project=P [TPU_PROJECT, optional]
#   --type=ACCELERATOR_TYPE [TPU_TYPE, default v5litepod-8], e.g. v4-32, v5p-64, v6e-16
#   --version=RUNTIME [TPU_VERSION; default by type: v4 tpu-ubuntu2204-base, v5litepod
#             v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e]
#   --spot  --queued  --worker=all|N (commands that reach workers; default all)
#   --job=NAME (log file name; default vigface)  --dir=DIR (remote checkout, default vigface_jax)
#   --git=URL --ref=REF (for pull)  --dry-run (print every command, run none)
#
# Data and checkpoints can live in gs:// buckets: every reader and Orbax take gs:// paths, e.g.
#   launch/tpu.sh --name=vig --zone=us-central2-b run -- --config=configs/dit.py \
#     --config.data.path=gs://bucket/faces_webface_112x112/train.rec \
#     --config.stage1.workdir=gs://bucket/runs/stage1 --workdir=gs://bucket/runs/stage2
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/_lib.sh
source "$HERE/_lib.sh"

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
TYPE=${TPU_TYPE:-v5litepod-8}
VERSION=${TPU_VERSION:-}
SPOT=0
QUEUED=0
WORKER=all
JOB=vigface
DIR=vigface_jax
GIT_URL=""
REF=main

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --type=*) TYPE=${1#*=} ;;
    --version=*) VERSION=${1#*=} ;;
    --worker=*) WORKER=${1#*=} ;;
    --job=*) JOB=${1#*=} ;;
    --dir=*) DIR=${1#*=} ;;
    --git=*) GIT_URL=${1#*=} ;;
    --ref=*) REF=${1#*=} ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --*) die "unknown option $1 (options take the form --name=value; see --help)" ;;
    *) break ;;
  esac
  shift
done
[[ $# -gt 0 ]] || die "no command; see --help"
COMMAND=$1
shift
if [[ "${1-}" == "--" ]]; then
  shift
fi

[[ -n "$NAME" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or TPU_ZONE) is required"
[[ "$JOB" =~ ^[A-Za-z0-9._-]+$ ]] || die "--job=$JOB: letters, digits, '.', '_' and '-' only"
if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default runtime for --type=$TYPE; give --version=RUNTIME" ;;
  esac
fi

LOCATION=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  LOCATION+=(--project="$PROJECT")
fi

# ssh to the workers (--worker), running one shell command string there.
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$WORKER" \
    --command="$1"
}

case "$COMMAND" in
  create)
    SPOT_FLAG=()
    if [[ "$SPOT" == 1 ]]; then
      SPOT_FLAG=(--spot)
    fi
    if [[ "$QUEUED" == 1 ]]; then
      run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" \
        "${LOCATION[@]}" --accelerator-type="$TYPE" --runtime-version="$VERSION" \
        "${SPOT_FLAG[@]}"
      echo "queued; 'launch/tpu.sh --name=$NAME --zone=$ZONE --queued status' says when it is ACTIVE"
    else
      run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
        --accelerator-type="$TYPE" --version="$VERSION" "${SPOT_FLAG[@]}"
    fi
    ;;
  status)
    if [[ "$QUEUED" == 1 ]]; then
      run gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}"
    else
      run gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}"
    fi
    ;;
  delete)
    if [[ "$QUEUED" == 1 ]]; then
      # --force deletes the TPU VM the queued resource holds, then the request.
      run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
    fi
    ;;
  copy)
    REPO=$(cd "$HERE/.." && pwd)
    ARCHIVE=${TMPDIR:-/tmp}/vigface_jax-$$.tar.gz
    run git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" HEAD
    run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:vigface_jax.tar.gz" "${LOCATION[@]}" \
      --worker="$WORKER"
    on_workers "mkdir -p $(quote_words "$DIR") && tar -xzf vigface_jax.tar.gz -C $(quote_words "$DIR")"
    if [[ "$DRY_RUN" != 1 ]]; then
      rm -f "$ARCHIVE"
    fi
    ;;
  pull)
    [[ -n "$GIT_URL" ]] || die "pull needs --git=URL (and optionally --ref=REF)"
    D=$(quote_words "$DIR")
    on_workers "if [ -d $D/.git ]; then git -C $D fetch --quiet origin; else git clone --quiet $(quote_words "$GIT_URL") $D; fi && git -C $D checkout --quiet $(quote_words "$REF")"
    ;;
  setup)
    on_workers "cd $(quote_words "$DIR") && python3 -m pip install --quiet -e '.[tpu]' && python3 -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
    ;;
  run)
    [[ $# -gt 0 ]] || die "run needs the main job's arguments after --, e.g. -- --config=configs/dit.py --workdir=gs://b/run"
    on_workers "cd $(quote_words "$DIR") && mkdir -p ~/vigface_logs && python3 -m vigface_jax.main $(quote_words "$@") 2>&1 | tee -a ~/vigface_logs/$JOB.log"
    ;;
  logs)
    if [[ "$WORKER" == all ]]; then
      WORKER=0
    fi
    on_workers "tail -n +1 -f ~/vigface_logs/$JOB.log"
    ;;
  profile)
    [[ $# -eq 2 ]] || die "profile needs WORKDIR DEST (the run's --workdir, a local folder)"
    SRC=$1
    DEST=$2
    if [[ "$SRC" == gs://* ]]; then
      run gcloud storage cp -r "${SRC%/}/profile" "$DEST"
    else
      run mkdir -p "$DEST"
      run gcloud compute tpus tpu-vm scp --recurse "$NAME:${SRC%/}/profile" "$DEST" \
        "${LOCATION[@]}" --worker=0
    fi
    echo "view: tensorboard --logdir=$DEST (pip install tensorboard-plugin-profile), or open a" \
      "plugins/profile/*/*.trace.json.gz in https://ui.perfetto.dev"
    ;;
  ssh)
    [[ $# -gt 0 ]] || die "ssh needs a command after --"
    on_workers "$*"
    ;;
  *)
    die "unknown command $COMMAND; see --help"
    ;;
esac
