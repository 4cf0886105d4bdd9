#!/usr/bin/env bash
# The GPU check, in two halves (see the `device` tool: the GPU machine has no cargo, no network).
#
#   ./scripts/gpu-check.sh prepare   # here: CUDA build; copies the binaries to gpu-check/bin
#   ./scripts/gpu-check.sh run       # there, in the repo root, with gpu-check/ carried
#
# `run` prints the GPU and driver, runs tests/cuda.rs (CPU-vs-GPU parity of the tiny model's
# UNet output and LoRA gradients in f32 and bf16, chunked attention, generation in f32 / bf16 /
# f16 without NaN), then times SD 1.5-config LoRA training steps (random weights, rank 16 on
# q,k,v, 512 px = 64x64 latents) and prints a table of s/step and GPU memory in use.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    source scripts/cuda-env.sh
    export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-${SD_LORA_CACHE:-$HOME/.cache/sd-lora}/target-cuda}"
    cargo build --locked --release --features cuda --bin sd-lora
    test_bin=$(cargo test --locked --release --features cuda --test cuda --no-run \
        --message-format=json 2>/dev/null |
        python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
    # stripped and gzipped: the device tool carries at most 64 MiB with the working tree
    # (~160 MB each as built, ~60 MB stripped, ~17 MB gzipped)
    rm -rf gpu-check/bin && mkdir -p gpu-check/bin
    strip -o gpu-check/bin/sd-lora "$CARGO_TARGET_DIR/release/sd-lora"
    strip -o gpu-check/bin/cuda-tests "$test_bin"
    gzip -9 gpu-check/bin/sd-lora gpu-check/bin/cuda-tests
    grep -qx '/gpu-check/' .git/info/exclude 2>/dev/null || echo '/gpu-check/' >> .git/info/exclude
    ls -la gpu-check/bin
    echo "now: device run with carry [\"gpu-check\"] and command ./scripts/gpu-check.sh run"
    ;;
run)
    for f in sd-lora cuda-tests; do
        [[ -x gpu-check/bin/$f ]] || { gunzip -c "gpu-check/bin/$f.gz" > "gpu-check/bin/$f"; chmod +x "gpu-check/bin/$f"; }
    done
    # CUDA 13 libraries from the machine's PyTorch venv; the driver's libcuda is on the loader path
    py=$(command -v python3)
    libs=$("$py" -c 'import nvidia, os, glob; print(":".join(sorted(glob.glob(os.path.join(nvidia.__path__[0], "*", "lib")))))' 2>/dev/null || true)
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    export SD_LORA_TINY_MODEL="$PWD/assets/tiny-sd"
    out="${OUT:-/tmp}"
    ./gpu-check/bin/cuda-tests --test-threads=1 --nocapture 2>&1 | tee "$out/cuda-tests.log"
    echo
    echo "| workload | dtype | s/step (median) | min | max | GPU memory in use |"
    echo "|---|---|---|---|---|---|"
    for spec in "64 1 bf16" "64 4 bf16" "64 4 f16" "64 4 f32"; do
        set -- $spec
        line=$(./gpu-check/bin/sd-lora bench train --model sd15 --latent "$1" --batch "$2" \
            --dtype "$3" --device cuda --steps 5 --json 2>>"$out/bench.err" || echo '{}')
        echo "$line" >> "$out/bench.jsonl"
        python3 -c 'import json, sys
r = json.loads(sys.argv[1] or "{}")
lat, b, dt = sys.argv[2:5]
if not r: print(f"| SD 1.5 LoRA train, {int(lat)*8} px, batch {b} | {dt} | failed (see bench.err) | | | |")
else:
    med, lo, hi, mem = r["median_s"], r["min_s"], r["max_s"], r["gpu_mem_mib"] or 0
    print(f"| SD 1.5 LoRA train, {int(lat)*8} px, batch {b} | {dt} | {med:.3f} | {lo:.3f} | {hi:.3f} | {mem:.0f} MiB |")' "$line" "$@"
    done
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
