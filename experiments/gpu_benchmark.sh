#!/usr/bin/env bash
# The device benchmark: img512-S-shaped throughput (random weights) for none / in-situ / decoder-prefix
# in-situ / autoguidance, in float32 and bfloat16, achieved TFLOP/s against the device's peak, peak
# memory, and, when EDM2_OFFICIAL names a clone of NVlabs/edm2 (and torch is installed), the official
# sampler on the same weights in float16 — all in one JSON (OUT, default gpu_benchmark.json).
#
#   bash experiments/gpu_benchmark.sh                              # on a GPU machine
#   EDM2_OFFICIAL=~/edm2 bash experiments/gpu_benchmark.sh         # with the official side-by-side
#   PRESET= BATCH=2 STEPS=2 bash experiments/gpu_benchmark.sh --repeats=1   # a tiny dry run on CPU
# (PYTHON: the interpreter with edm2-jax installed, default python3)
set -euo pipefail
PRESET=${PRESET-img512-s}
official=()
if [ -n "${EDM2_OFFICIAL:-}" ]; then
  official=(--vs_official="$EDM2_OFFICIAL" --official_device="${OFFICIAL_DEVICE:-cuda}" --official_fp16)
fi
exec "${PYTHON:-python3}" -m experiments.benchmark --preset="$PRESET" --batch="${BATCH:-32}" --steps="${STEPS:-32}" \
  --dtypes=float32,bfloat16 --methods=none,insitu-fused,insitu-decoder-prefix,autoguidance \
  --out="${OUT:-gpu_benchmark.json}" "${official[@]}" "$@"
