#!/usr/bin/env bash
# One-shot GPU check (at most ~8 minutes on one GPU): paper-vitb forward for one patient,
# mask-free 5-fold + TTA diagnosis per case including nnU-Net masks (random weights), and the
# paper-vitb training step at batch 4, each against the challenge limits (30 s per case,
# < 12 GB) and the issue's targets; writes docs/performance-gpu.md (+ .json).
#
#   bash docs/scripts/gpu_check.sh                 # on a CUDA machine, from the repository root
#   bash docs/scripts/gpu_check.sh --cpu-smoke     # CPU, tiny models: checks the script only;
#                                                  # writes /tmp/gpu_check_smoke/performance-gpu.md
# Options: --out FILE (report), --cases N (timed mask-free cases, default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
smoke=""
out=""
cases=2
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-smoke) smoke="--cpu-smoke"; shift ;;
    --out) out="$2"; shift 2 ;;
    --cases) cases="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [[ -n "$smoke" ]]; then
  out="${out:-/tmp/gpu_check_smoke/performance-gpu.md}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  out="${out:-docs/performance-gpu.md}"
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/mrn_gpu_check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export MRN_CACHE_DIR="$work/cache"
# 8-minute budget on the GPU (30 on the CPU smoke run): stopped, it still writes what it has
budget=480
[[ -n "$smoke" ]] && budget=1800
timeout --signal=INT "$budget" python docs/scripts/gpu_check.py $smoke --out "$out" --work "$work" \
  --cases "$cases"
