#!/usr/bin/env bash
# One-command GPU check of the Triton multipole kernels (see bench/gpu_check.py):
#   bash bench/gpu_check.sh              # CUDA machine: correctness, then time/memory vs SDPA flash
#   bash bench/gpu_check.sh --dry-run    # CPU plumbing check under TRITON_INTERPRET=1, tiny sizes
# Needs only torch and triton in $PYTHON (default python3): the repo is used from this
# checkout through PYTHONPATH, nothing is installed and nothing is downloaded.
# Writes gpu_check.json to $OUT (else bench/results/; a temporary folder for --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then export TRITON_INTERPRET=1; fi
done
"$PY" -c "import torch, triton" || { echo "gpu_check: $PY lacks torch or triton" >&2; exit 2; }
exec "$PY" bench/gpu_check.py "$@"
