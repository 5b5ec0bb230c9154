#!/usr/bin/env bash
# The accelerator benchmarks in under 8 minutes: install the accelerator extra, run
# `python -m benchmarks.run --suite accelerator` on the GPU or TPU that is present (JAX against
# PyTorch, model FLOP utilisation against the device's bf16 peak, peak device memory), and
# write one results file.
#
#   benchmarks/accelerator.sh                  # NVIDIA GPU (nvidia-smi) or TPU VM (/dev/accel*)
#   benchmarks/accelerator.sh --no-install     # the extra and torch are already installed
#   benchmarks/accelerator.sh --dry-run        # print every command; run nothing
#   benchmarks/accelerator.sh --cpu --out=/tmp/acc.md   # CPU form (tests): tiny sizes
#
# Options:
#   --out=PATH             results file (default benchmarks/results/accelerator-<device>-<date>.md)
#   --budget=SECONDS       the whole script, installs included (default 470: under 8 minutes)
#   --per-benchmark=SECS   each benchmark's timeout (default 170)
#   --only=a,b             run some of the suite's benchmarks (benchmarks.run --only)
#   --cpu                  no install, JAX_PLATFORMS=cpu, benchmarks.run --tiny
#   --no-install           skip the pip installs
#   --dry-run              print every command it would run, run nothing
#
# Steps, each printed before it runs: (1) `pip install -e ".[cuda]"` on NVIDIA (".[cuda12]"
# for a driver older than CUDA 13), ".[tpu]" on a TPU VM; (2) the PyTorch reference: on NVIDIA
# the CUDA wheel torch==2.13.0 (cu128) unless torch already sees the GPU, so the training steps
# compare JAX and PyTorch on the same GPU (`--torch_device=auto`); if that install fails, the
# CPU wheel (only if torch is missing), PyTorch on the host CPU, and the results file says so;
# elsewhere the CPU wheel if `import torch` fails; diffusers and faiss-cpu if missing; (3) the
# suite: the training steps in bf16 compute with float32 weights (`--dtype=bfloat16`), the MFU
# against the bf16 peak. Installs may use what the budget leaves beyond 200 s.
set -euo pipefail

PYTHON=${PYTHON:-python}
CPU=0 INSTALL=1 DRY=0 OUT="" BUDGET=470 PER=170 ONLY=""
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 INSTALL=0 ;;
    --no-install) INSTALL=0 ;;
    --dry-run) DRY=1 ;;
    --out=*) OUT=${arg#--out=} ;;
    --budget=*) BUDGET=${arg#--budget=} ;;
    --per-benchmark=*) PER=${arg#--per-benchmark=} ;;
    --only=*) ONLY=${arg#--only=} ;;
    -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "accelerator.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n $OUT && $OUT != /* ]] && OUT="$PWD/$OUT"  # as given, from the caller's directory
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() { echo; echo "== $*"; }
show() { printf '+'; printf ' %q' "$@"; echo; }
# Runs "$@" (printed first) unless --dry-run, under `timeout` of $1 seconds.
run_for() {
  local seconds=$1; shift
  show "$@"
  if [[ $DRY == 0 ]]; then timeout --kill-after=10 "$seconds" "$@"; fi
}
# An install may take what the budget leaves beyond RESERVE seconds for the benchmarks.
RESERVE=200
install_for() {
  local seconds=$((BUDGET - SECONDS - RESERVE))
  if (( seconds < 10 )); then
    echo "accelerator.sh: no budget left to install (${BUDGET} s, ${RESERVE} s kept for the" \
         "benchmarks); rerun with --no-install" >&2
    exit 1
  fi
  run_for "$seconds" "$@"
}

if [[ $CPU == 1 ]]; then
  export JAX_PLATFORMS=cpu
  PLATFORM=cpu EXTRA="" DEVICE=cpu
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  PLATFORM=nvidia EXTRA=cuda
  DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
  # jax[cuda13] needs a CUDA 13 driver; older drivers get the cuda12 extra.
  CUDA_MAJOR=$(nvidia-smi | grep -o "CUDA Version: [0-9]*" | grep -o "[0-9]*$" || echo 13)
  (( CUDA_MAJOR < 13 )) && EXTRA=cuda12
elif compgen -G "/dev/accel*" >/dev/null || compgen -G "/dev/vfio/[0-9]*" >/dev/null; then
  PLATFORM=tpu EXTRA=tpu DEVICE="tpu-${TPU_ACCELERATOR_TYPE:-vm}"
elif [[ $DRY == 1 ]]; then
  echo "accelerator.sh: no NVIDIA GPU or TPU found here; showing the NVIDIA commands"
  PLATFORM=nvidia EXTRA=cuda DEVICE="nvidia-gpu"
else
  echo "accelerator.sh: no NVIDIA GPU (nvidia-smi) or TPU (/dev/accel*) found;" \
       "--cpu runs the CPU form" >&2
  exit 2
fi
SLUG=$(echo "$DEVICE" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9.' '-' | sed 's/^-*//;s/-*$//')
OUT=${OUT:-benchmarks/results/accelerator-${SLUG}-$(date -u +%Y-%m-%d).md}
echo "accelerator.sh: platform $PLATFORM, device '$DEVICE', budget ${BUDGET} s" \
     "(${PER} s per benchmark), results file $OUT"

step "1/3 accelerator extra"
if [[ $INSTALL == 1 ]]; then
  install_for "$PYTHON" -m pip install --disable-pip-version-check -e ".[${EXTRA}]"
else
  echo "skipped ($([[ $CPU == 1 ]] && echo "--cpu" || echo "--no-install"))"
fi

NOTES=()  # benchmarks.run --note lines for the results file
TORCH_WHL=https://download.pytorch.org/whl
has() { "$PYTHON" -c "$1" 2>/dev/null; }
step "2/3 PyTorch reference (on the GPU where torch can use it, else the host CPU)"
if [[ $INSTALL == 1 ]]; then
  if [[ $PLATFORM == nvidia ]] && ! has "import sys, torch; sys.exit(not torch.cuda.is_available())"
  then
    echo "installing the CUDA torch wheel (JAX and PyTorch on the same GPU)"
    if ! install_for "$PYTHON" -m pip install --disable-pip-version-check torch==2.13.0 \
        --index-url "$TORCH_WHL/cu128"; then
      echo "accelerator.sh: the CUDA torch wheel failed to install; PyTorch runs on the host CPU"
      NOTES+=("--note=accelerator.sh: installing the CUDA torch wheel (torch==2.13.0, cu128)"\
" failed, so PyTorch ran on the host CPU.")
    fi
  fi
  if ! has "import torch"; then
    install_for "$PYTHON" -m pip install --disable-pip-version-check torch==2.13.0 \
        --index-url "$TORCH_WHL/cpu"
  fi
  if ! has "import diffusers, faiss"; then
    install_for "$PYTHON" -m pip install --disable-pip-version-check diffusers==0.35.1 \
        faiss-cpu==1.15.1
  fi
else
  echo "skipped (--cpu / --no-install)"
fi
has "import torch; print('torch', torch.__version__, 'sees a GPU:', torch.cuda.is_available())" \
  || echo "torch is not importable"

step "3/3 benchmarks"
LEFT=$((BUDGET - SECONDS - 15))
if (( LEFT < 60 )); then
  echo "accelerator.sh: only ${LEFT} s of the ${BUDGET} s budget left for the benchmarks" >&2
  exit 1
fi
ARGS=(--suite accelerator "--output=$OUT" "--timeout=$PER" "--budget=$LEFT")
ARGS+=(${NOTES[@]+"${NOTES[@]}"})
[[ $CPU == 1 ]] && ARGS+=(--tiny)
[[ -n $ONLY ]] && ARGS+=("--only=$ONLY")
if [[ $DRY == 1 ]]; then
  show "$PYTHON" -m benchmarks.run "${ARGS[@]}"
  echo "(benchmarks.run --dry-run: the commands it would run)"
  "$PYTHON" -m benchmarks.run "${ARGS[@]}" --dry-run
  exit 0
fi
status=0
run_for $((LEFT + 30)) "$PYTHON" -m benchmarks.run "${ARGS[@]}" || status=$?
echo
echo "accelerator.sh: results in $OUT (exit $status, ${SECONDS} s)"
exit "$status"
