#!/usr/bin/env bash
# The project's whole test suite, as CI runs it (.ci/run calls exactly this).
# Build outputs live outside the checkout (~/.cache/sd-lora) so fresh clones reuse them.
# From scratch on 2 cores: ~10 min CPU build and tests, ~15 min evcxr install + ~8 min first
# notebook build, ~15 min CUDA build; warm: a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sd-lora/target}"
cargo fmt --check
./scripts/fetch-clip-bpe.sh   # CLIP's BPE list from PyPI (tokenizer tests), cached
cargo clippy --locked --release --all-targets -- -D warnings
cargo test --locked --release
./scripts/notebooks.sh        # every notebook, headless, with the evcxr kernel
./scripts/cuda-build.sh       # the `cuda` feature compiles (no GPU needed)
