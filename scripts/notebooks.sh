#!/usr/bin/env bash
# Executes every notebook in notebooks/ headlessly with the Rust (evcxr) kernel and fails on
# any error output or stderr stream; prints "N passed, N failed". Part of ./scripts/test.sh.
#
# Installs what it needs when missing (scripts/install-tools.sh: evcxr_jupyter 0.22.0 and its
# `rust` kernelspec, nbclient in a venv), all under $SD_LORA_CACHE (default ~/.cache/sd-lora).
# The kernel's build of the crate is kept in $SD_LORA_CACHE/evcxr (EVCXR_TMPDIR), so only the
# first run compiles candle (~6 min). Executed copies go to $SD_LORA_CACHE/notebooks-out/.
#
#   ./scripts/notebooks.sh [--update] [NOTEBOOK.ipynb ...]
#
# --update writes each passing notebook back with its outputs (commit them: a code host then
# shows every figure; tests/notebook_api.rs checks that no committed output is older than its
# cell's source).
set -euo pipefail
cd "$(dirname "$0")/.."
export SD_LORA_CACHE="${SD_LORA_CACHE:-$HOME/.cache/sd-lora}"
CACHE="$SD_LORA_CACHE"
./scripts/install-tools.sh nbclient evcxr
export PATH="$CACHE/tools/bin:$HOME/.cargo/bin:$PATH"
VENV="$CACHE/nb-venv"

export EVCXR_TMPDIR="$CACHE/evcxr"
mkdir -p "$EVCXR_TMPDIR"
# The kernel dlopens each cell's library, which links Rust's libstd dynamically. Its RUNPATH
# is relative to cargo's deps/ folder, one level off from where evcxr loads it, so it only
# resolves by accident for build folders directly under /tmp. Point the loader at libstd.
SYSROOT_LIB="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/lib"
export LD_LIBRARY_PATH="$SYSROOT_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# the kernel builds the crate with the same compiler; keep its warnings off the test's stderr check
exec "$VENV/bin/python" scripts/run_notebooks.py --out "$CACHE/notebooks-out" "$@"
