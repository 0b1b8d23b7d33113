#!/usr/bin/env bash
# Wheels of what the trainer needs beyond the GPU machine's image (python 3.12, torch, triton,
# sentencepiece, tensorboard; no deepspeed, no network): DeepSpeed (pure Python) and the
# requirements of it that the image lacks. Built here into .whl/ (git-ignored), carried along,
# and installed there by bench/gpu_check.sh into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PY="${PYTHON:-python3}"
"$PY" -m pip wheel -q --no-deps -w .whl "deepspeed==${DEEPSPEED_VERSION:-0.19.8}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 hjson==3.1.0 \
  typing-extensions==4.16.0
ls .whl
