#!/usr/bin/env bash
# One-time installs of what the tests need beyond cargo, each skipped when already present.
# Everything goes under $SD_LORA_CACHE (default ~/.cache/sd-lora), nothing into ~/.cargo/bin.
#
#   ./scripts/install-tools.sh WHAT...
#     clip-bpe   CLIP's BPE merge list from PyPI (tokenizer tests)
#     nbclient   a venv with nbclient (runs the notebooks headlessly)
#     cuda       the CUDA 13.0 toolkit wheels and the link-only libcuda stub (scripts/cuda-env.sh)
#     downloads  the three above: network-bound, scripts/test.sh runs them in the background
#     evcxr      evcxr_jupyter 0.22.0 (CPU-bound) and its `rust` kernelspec
set -euo pipefail
cd "$(dirname "$0")/.."
export SD_LORA_CACHE="${SD_LORA_CACHE:-$HOME/.cache/sd-lora}"
mkdir -p "$SD_LORA_CACHE"
EVCXR_VERSION=0.22.0

install_nbclient() {
    local venv="$SD_LORA_CACHE/nb-venv"
    if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import nbclient" 2>/dev/null; then
        echo "creating $venv with nbclient"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "nbclient==0.10.2" "nbformat==5.10.4"
    fi
}

install_evcxr() {
    local root="$SD_LORA_CACHE/tools"
    if ! cargo install --list --root "$root" | grep -q "^evcxr_jupyter v$EVCXR_VERSION:"; then
        echo "installing evcxr_jupyter $EVCXR_VERSION into $root (one time)"
        # The kernel only drives cargo and rust-analyzer's type inference on a cell's few
        # lines: opt-level 1 with many codegen units compiles in far less time than the default
        # release profile and runs the notebooks as fast (BENCHMARKS.md, "Test command").
        CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_CODEGEN_UNITS=256 \
            CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_LTO=off \
            CARGO_TARGET_DIR="$SD_LORA_CACHE/evcxr-build" \
            cargo install --locked evcxr_jupyter --version "$EVCXR_VERSION" --root "$root"
        rm -rf "$SD_LORA_CACHE/evcxr-build"
    fi
    # the `rust` kernelspec goes where evcxr puts it (Jupyter's user data folder,
    # ~/.local/share/jupyter); rewritten when it names another evcxr binary
    local kspec="${JUPYTER_DATA_DIR:-$HOME/.local/share/jupyter}/kernels/rust/kernel.json"
    if [[ ! -f "$kspec" ]] || ! grep -q "$root/bin/evcxr_jupyter" "$kspec"; then
        "$root/bin/evcxr_jupyter" --install
    fi
}

[[ $# -gt 0 ]] || { sed -n '2,10p' "$0" >&2; exit 2; }
for what in "$@"; do
    t0=$SECONDS
    case "$what" in
    clip-bpe) ./scripts/fetch-clip-bpe.sh ;;
    nbclient) install_nbclient ;;
    cuda) (source scripts/cuda-env.sh) ;;
    downloads) "$0" clip-bpe nbclient cuda ;;
    evcxr) install_evcxr ;;
    *) echo "unknown tool \`$what\` (clip-bpe, nbclient, cuda, downloads, evcxr)" >&2; exit 2 ;;
    esac
    echo "$what: ready ($((SECONDS - t0)) s)"
done
