#!/usr/bin/env bash
# The project's whole test suite, as CI runs it (.ci/run calls exactly this).
# Build outputs live outside the checkout so fresh clones reuse them.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sd-lora/target}"
cargo fmt --check
./scripts/fetch-clip-bpe.sh   # CLIP's BPE list from PyPI (tokenizer tests), cached
cargo clippy --locked --release --all-targets -- -D warnings
cargo test --locked --release
