#!/usr/bin/env bash
# The GPU check, in two halves (see the `device` tool: the GPU machine has no cargo, no network).
#
#   ./scripts/gpu-check.sh prepare   # here: CUDA build; copies the binaries to gpu-check/bin
#   ./scripts/gpu-check.sh run       # there, in the repo root, with gpu-check/ carried
#
# `run` prints the GPU and driver, runs tests/cuda.rs (CPU-vs-GPU parity of the tiny model's
# UNet output and LoRA gradients in f32 and bf16, chunked attention, generation in f32 / bf16 /
# f16 without NaN), then times SD 1.5-config LoRA training steps (random weights, rank 16 on
# q,k,v, 512 px = 64x64 latents) and prints a table of s/step and GPU memory in use; then the
# side-by-side table: the same SD 1.5 shapes in ours and in diffusers + PEFT on the same GPU
# (training at batch 1 and 4 in bf16 and fp16, with and without gradient checkpointing;
# 20-step CFG generation), with `estimate-memory`'s prediction beside each of our runs.
# The GPU machine has PyTorch, transformers and PEFT but not diffusers: `prepare` downloads
# the pure-Python wheels diffusers 0.42.1 and importlib_metadata into gpu-check/whl, and `run`
# installs them there with pip --no-index (nothing is fetched there).
set -euo pipefail
cd "$(dirname "$0")/.."
# ours and diffusers + PEFT on the same shapes, one table (called by `run`)
side_by_side() {
    local out=$1 ours theirs est gc
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site gpu-check/whl/*.whl; then
        export PYTHONPATH=/tmp/site
    else
        echo "the carried diffusers wheels did not install: the diffusers columns will fail"
    fi
    mkdir -p "$HOME/.cache/sd-lora/clip-bpe" && cp gpu-check/clip-bpe/*.gz "$HOME/.cache/sd-lora/clip-bpe/"
    echo
    echo "| SD 1.5, 512 px | dtype | ours s | diffusers s | ours GPU MiB | diffusers GPU MiB (peak allocated) | estimate MiB |"
    echo "|---|---|---|---|---|---|---|"
    for spec in "1 bf16 -" "4 bf16 -" "1 bf16 gc" "4 bf16 gc" "4 fp16 -" "4 fp16 gc"; do
        set -- $spec
        gc=""; [[ $3 == gc ]] && gc="--gradient-checkpointing"
        ours=$(timeout 150 ./gpu-check/bin/sd-lora bench train --model sd15 --latent 64 --batch "$1" \
            --dtype "${2/fp16/f16}" --device cuda --steps 5 $gc --json 2>>"$out/side.err" || echo '{}')
        theirs=$(timeout 150 python3 benches/peer/train_diffusers.py --model sd15 --latent 64 --batch "$1" \
            --device cuda --dtype "$2" --steps 5 $gc 2>>"$out/side.err" | tail -1 || echo '{}')
        est=$(./gpu-check/bin/sd-lora estimate-memory --model sd15 --resolution 512 --batch-size "$1" \
            --dtype "${2/fp16/f16}" --device cuda $gc --json 2>>"$out/side.err" || echo '{}')
        printf '%s\n%s\n%s\n' "$ours" "$theirs" "$est" >> "$out/side.jsonl"
        python3 benches/peer/gpu_row.py train "$1" "$2" "$3" "$ours" "$theirs" "$est"
    done
    ours=$(timeout 150 ./gpu-check/bin/sd-lora bench generate --model sd15 --latent 64 --batch 1 \
        --dtype bf16 --device cuda --steps 3 --json 2>>"$out/side.err" || echo '{}')
    theirs=$(timeout 150 python3 benches/peer/generate_diffusers.py --model sd15 --latent 64 --batch 1 \
        --device cuda --dtype bf16 --steps 3 2>>"$out/side.err" | tail -1 || echo '{}')
    printf '%s\n%s\n' "$ours" "$theirs" >> "$out/side.jsonl"
    python3 benches/peer/gpu_row.py generate bf16 "$ours" "$theirs"
}

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
    rm -rf gpu-check/whl && mkdir -p gpu-check/whl gpu-check/clip-bpe
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d gpu-check/whl diffusers==0.42.1 importlib_metadata==8.7.0
    ./scripts/fetch-clip-bpe.sh
    cp "${SD_LORA_CACHE:-$HOME/.cache/sd-lora}/clip-bpe/bpe_simple_vocab_16e6.txt.gz" gpu-check/clip-bpe/
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
    side_by_side "$out"
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
