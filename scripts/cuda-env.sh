# Sourced by cuda-build.sh and gpu-check.sh: a CUDA 13.0 toolkit from PyPI wheels in a venv
# (no GPU, no system CUDA needed) and a link-only libcuda stub. Sets CUDA_HOME, PATH,
# LIBRARY_PATH and CUDA_COMPUTE_CAP.
#
# 13.0 because the newest driver seen on the GPU machines lent to this project is CUDA 13.0
# (driver 580): PTX from a newer nvcc would not load there. cudarc 0.19 accepts up to 13.4.
CUDA_VENV="${CUDA_VENV:-${SD_LORA_CACHE:-$HOME/.cache/sd-lora}/cuda-venv}"
CUDA_WHEELS=(
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
    nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
)
if [[ ! -f "$CUDA_VENV/.complete-13.0" ]]; then
    echo "installing the CUDA 13.0 toolkit wheels into $CUDA_VENV (one time, ~1 GB)"
    python3 -m venv "$CUDA_VENV"
    "$CUDA_VENV/bin/pip" install --quiet --disable-pip-version-check "${CUDA_WHEELS[@]}"
    touch "$CUDA_VENV/.complete-13.0"
fi
CUDA_HOME="$("$CUDA_VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
export CUDA_HOME CUDA_PATH="$CUDA_HOME" CUDA_ROOT="$CUDA_HOME"
# the wheels ship versioned sonames only; the linker wants the plain names
for lib in "$CUDA_HOME"/lib/lib*.so.*; do
    base="${lib%%.so.*}.so"
    [[ -e "$base" ]] || ln -s "$(basename "$lib")" "$base"
done
# libcuda.so is the driver: a stub that only satisfies the linker (the real one is loaded at
# run time on a GPU machine). It defines every driver function cudarc declares (taken from
# cudarc's source, the version in Cargo.lock).
STUB="$CUDA_VENV/stub"
CUDARC_VERSION=$(sed -n '/^name = "cudarc"$/{n;s/^version = "\(.*\)"$/\1/p}' Cargo.lock)
if [[ ! -f "$STUB/libcuda.so" || ! -f "$STUB/.cudarc-$CUDARC_VERSION" ]]; then
    cargo fetch --locked >/dev/null
    src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$CUDARC_VERSION" | head -1)
    mkdir -p "$STUB"
    grep -ohE '^\s+fn cu[A-Za-z0-9_]+\(' "$src"/src/driver/sys/mod.rs |
        sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u |
        awk '{ print "int " $1 "(void) { return 999; }" }' > "$STUB/stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so" "$STUB/stub.c"
    rm -f "$STUB"/.cudarc-*
    touch "$STUB/.cudarc-$CUDARC_VERSION"
    echo "libcuda stub: $(wc -l < "$STUB/stub.c") driver functions from cudarc $CUDARC_VERSION"
fi
export PATH="$CUDA_HOME/bin:$PATH"
export LIBRARY_PATH="$CUDA_HOME/lib:$STUB${LIBRARY_PATH:+:$LIBRARY_PATH}"
# no GPU to ask: build PTX for the H200 (sm_90) unless told otherwise
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
