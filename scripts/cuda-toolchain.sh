#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI into .cuda/ (no GPU or system CUDA needed) and prepares a
# CUDA_HOME there, so that `cargo build --features cuda` works on a CPU-only machine.
# Pinned: unpinned pulls 13.5, whose PTX a CUDA 13.0 driver cannot load.
# Usage: source <(scripts/cuda-toolchain.sh)   # prints the exports to use
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.cuda/py"
if [ ! -x "$dest/nvidia/cu13/bin/nvcc" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$dest" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
fi
home="$dest/nvidia/cu13"
[ -e "$home/lib64" ] || ln -s lib "$home/lib64"
[ -e "$home/lib/libcudart.so" ] || ln -s libcudart.so.13 "$home/lib/libcudart.so"

# Link stubs: candle links cudarc with `dynamic-linking`, so the linker wants libcuda, cuBLAS,
# cuBLASLt, cuRAND and NVRTC. Build empty-bodied stand-ins that export every function cudarc
# declares, under the real sonames; on a GPU host the dynamic loader picks the real libraries
# (LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib). Never put stubs on a GPU host's path.
stubs="$dest/nvidia/cu13/lib/stubs"   # a folder cudarc's build script searches under CUDA_HOME
if [ ! -e "$stubs/.done" ]; then
  cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -n 1)"
  if [ -z "$cudarc" ]; then
    echo "cudarc sources not found: run 'cargo fetch' first" >&2
    exit 1
  fi
  mkdir -p "$stubs"
  for spec in driver:cuda:libcuda.so.1 cublas:cublas:libcublas.so.13 cublaslt:cublasLt:libcublasLt.so.13 \
              curand:curand:libcurand.so.10 nvrtc:nvrtc:libnvrtc.so.13; do
    IFS=: read -r module lib soname <<<"$spec"
    grep -oE '^pub unsafe fn [A-Za-z0-9_]+' "$cudarc/src/$module/sys/mod.rs" | awk '{print "void " $4 "(void) {}"}' | sort -u >"$stubs/$lib.c"
    gcc -shared -fPIC -Wl,-soname,"$soname" -o "$stubs/lib$lib.so" "$stubs/$lib.c"
  done
  touch "$stubs/.done"
fi
echo "export CUDA_HOME=$home"
echo "export CUDA_ROOT=$home"
echo "export PATH=$home/bin:\$PATH"
echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
