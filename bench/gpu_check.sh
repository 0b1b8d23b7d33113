#!/usr/bin/env bash
# One-command GPU check (a CUDA machine, under 10 minutes; every part bounded by its own budget):
#   1. bench/gpu_check.py: the Triton kernels against the PyTorch path in float64 (correctness),
#      then time and memory against SDPA flash;
#   2. bench/gpu_train.py: the trainer (DeepSpeed ZeRO 2, bf16) on the 125M causal config at
#      131072 tokens, fma against sdpa, and a 1M-token fma step.
#   bash bench/gpu_check.sh              # CUDA machine
#   bash bench/gpu_check.sh --dry-run    # CPU plumbing check (TRITON_INTERPRET=1, tiny sizes)
#   bash bench/gpu_check.sh --quick      # the five-minute check instead (bench/gpu_quick.py; --dry-run too)
# The repo is used from this checkout through PYTHONPATH; nothing is downloaded. Wheels in .whl/
# (bench/gpu_wheels.sh builds them: DeepSpeed and its missing requirements) are installed into
# /tmp/site first where DeepSpeed is missing. JSON goes to $OUT (else bench/results/; a temporary folder for
# --dry-run) as gpu_check-<tag>.json, gpu_train-<tag>.json and roofline-<tag>.json, the tag the card and
# the date (nvidia-h200-2026-11-28) or dry-run (bench/_results.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepspeed') is None)" \
   && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DRY=() QUICK=0 ARGS=()
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then export TRITON_INTERPRET=1; DRY=(--dry-run); fi
  if [ "$a" = "--quick" ]; then QUICK=1; else ARGS+=("$a"); fi
done
"$PY" -c "import torch, triton" || { echo "gpu_check: $PY lacks torch or triton" >&2; exit 2; }
[ ${#DRY[@]} -eq 0 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# --quick: the five-minute check (bench/gpu_quick.py: the card, every launch candidate's gate and
# time at 16k/128k/1M with a per-kernel split, the trainer at 131072), instead of the sweep below.
if [ "$QUICK" = 1 ]; then
  exec timeout "${QUICK_BUDGET:-330}" "$PY" bench/gpu_quick.py --budget "$(( ${QUICK_BUDGET:-330} - 30 ))" ${ARGS[@]+"${ARGS[@]}"}
fi
rc=0
# A part's budget of 0 skips it (KERNEL_BUDGET=0 or TRAIN_BUDGET=0).
KB="${KERNEL_BUDGET:-270}" TB="${TRAIN_BUDGET:-270}"
if [ "$KB" -gt 0 ]; then
  timeout "$KB" "$PY" bench/gpu_check.py --budget "$((KB - 60))" "$@" || rc=1
  # What the timed cases must compute and move, and the fraction of the roofline they reach.
  if [ ${#DRY[@]} -eq 0 ] && [ -n "${OUT:-}" ]; then
    for f in "$OUT"/gpu_check-*.json; do
      [ -f "$f" ] && "$PY" bench/roofline.py "$f" --out "$OUT"
    done
  fi
fi
# The trainer's check runs without the interpreter: Triton on CPU would be far too slow for it.
if [ "$TB" -gt 0 ]; then
  env -u TRITON_INTERPRET timeout "$TB" "$PY" bench/gpu_train.py --budget "$((TB - 15))" "${DRY[@]}" || rc=1
fi
exit $rc
