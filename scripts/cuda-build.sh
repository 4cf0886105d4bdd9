#!/usr/bin/env bash
# Compiles the `cuda` feature (every target: library, binary, tests, examples, benches) on a
# machine without a GPU or a system CUDA: the toolkit comes from PyPI wheels and libcuda from
# a link-only stub (scripts/cuda-env.sh). scripts/test.sh runs this; the build goes to its own
# target folder so it does not disturb the CPU build.
#
#   ./scripts/cuda-build.sh [extra cargo args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda-env.sh
export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-$HOME/.cache/sd-lora/target-cuda}"
echo "CUDA build: nvcc $(nvcc --version | grep -o 'release [0-9.]*'), sm_$CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR"
cargo build --locked --release --features cuda --all-targets "$@"
