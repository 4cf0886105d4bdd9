#!/usr/bin/env bash
# Compiles the `cuda` feature (every target: library, binary, tests, examples, benches) on a
# machine without a GPU or a system CUDA: the toolkit comes from PyPI wheels and libcuda from
# a link-only stub (scripts/cuda-env.sh). scripts/test.sh runs this; the build goes to its own
# target folder so it does not disturb the CPU build.
#
#   ./scripts/cuda-build.sh [--check] [extra cargo args]
#
# --check (what scripts/test.sh runs) type-checks every target instead of building it: that is
# what proves the CUDA code paths compile, and it skips the release code generation of candle
# and cudarc (the PTX kernels are still compiled by nvcc in candle-kernels' build script).
# ./scripts/gpu-check.sh prepare makes the real binaries for a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda-env.sh
export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-${SD_LORA_CACHE:-$HOME/.cache/sd-lora}/target-cuda}"
echo "CUDA build: nvcc $(nvcc --version | grep -o 'release [0-9.]*'), sm_$CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR"
if [[ "${1:-}" == --check ]]; then
    shift
    cargo check --locked --release --features cuda --all-targets "$@"
else
    cargo build --locked --release --features cuda --all-targets "$@"
fi
