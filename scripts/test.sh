#!/usr/bin/env bash
# The project's whole test suite, as CI runs it (.ci/run calls exactly this).
#
# Phases (each timed; a table of phase times is printed at the end, also on failure):
#   fmt, clippy (-D warnings), the release build and run of every test, the notebooks
#   (headless, evcxr kernel), the `cuda` feature type-checked with a CUDA toolkit from PyPI.
# One-time installs (evcxr_jupyter, nbclient, CUDA wheels, CLIP BPE list) are scripted and
# cached under $SD_LORA_CACHE (default ~/.cache/sd-lora); the downloads run in the background
# while the CPU compiles. Build outputs live there too, so fresh clones reuse them.
#
# Cold (nothing cached) on 2 cores: see BENCHMARKS.md "Test command"; warm: ~12 min.
set -euo pipefail
cd "$(dirname "$0")/.."
export SD_LORA_CACHE="${SD_LORA_CACHE:-$HOME/.cache/sd-lora}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SD_LORA_CACHE/target}"
mkdir -p "$SD_LORA_CACHE/logs"
source scripts/phases.sh

phase fmt cargo fmt --check

# network-bound one-time installs, started now so they overlap the compilation
bg_start downloads ./scripts/install-tools.sh downloads

phase clippy cargo clippy --locked --release --all-targets -- -D warnings
bg_wait downloads   # the tests need the CLIP BPE list
phase tests cargo test --locked --release
phase evcxr-install ./scripts/install-tools.sh evcxr
phase notebooks ./scripts/notebooks.sh
phase cuda-check ./scripts/cuda-build.sh --check
phase_report
