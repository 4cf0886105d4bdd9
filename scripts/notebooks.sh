#!/usr/bin/env bash
# Executes every notebook in notebooks/ headlessly with the Rust (evcxr) kernel and fails on
# any error output or stderr stream; prints "N passed, N failed". Part of ./scripts/test.sh.
#
# Installs what it needs when missing (skipped when present):
#   evcxr_jupyter 0.22.0 (cargo install --locked, ~15 min on 2 cores) and its `rust` kernelspec;
#   nbclient in a venv under ~/.cache/sd-lora/nb-venv.
# The kernel's build of the crate is kept in ~/.cache/sd-lora/evcxr (EVCXR_TMPDIR), so only the
# first run compiles candle (~7 min). Executed copies go to ~/.cache/sd-lora/notebooks-out/.
#
#   ./scripts/notebooks.sh [NOTEBOOK.ipynb ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="$HOME/.cache/sd-lora"
mkdir -p "$CACHE"
export PATH="$HOME/.cargo/bin:$PATH"

if ! cargo install --list | grep -q '^evcxr_jupyter v0.22.0:'; then
    echo "installing evcxr_jupyter 0.22.0 (one time, ~15 min)"
    cargo install --locked evcxr_jupyter --version 0.22.0
fi
KSPEC="${JUPYTER_DATA_DIR:-$HOME/.local/share/jupyter}/kernels/rust/kernel.json"
if [[ ! -f "$KSPEC" ]]; then
    evcxr_jupyter --install
fi

VENV="$CACHE/nb-venv"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import nbclient" 2>/dev/null; then
    echo "creating $VENV with nbclient"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "nbclient==0.10.2" "nbformat==5.10.4"
fi

export EVCXR_TMPDIR="$CACHE/evcxr"
mkdir -p "$EVCXR_TMPDIR"
# The kernel dlopens each cell's library, which links Rust's libstd dynamically. Its RUNPATH
# is relative to cargo's deps/ folder, one level off from where evcxr loads it, so it only
# resolves by accident for build folders directly under /tmp. Point the loader at libstd.
SYSROOT_LIB="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/lib"
export LD_LIBRARY_PATH="$SYSROOT_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# the kernel builds the crate with the same compiler; keep its warnings off the test's stderr check
exec "$VENV/bin/python" scripts/run_notebooks.py --out "$CACHE/notebooks-out" "$@"
